// The error contract (shared/errors.ts): every SOCKPOOL_ERR_* code that appears anywhere in the sources (the
// addon's C++ included) is registered; fields never hide the Error's own properties; a cause is kept as the
// standard Error.cause and its code crosses a boundary as `causeCode`; kernel failures keep Node's shape.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  ErrorCodes,
  type ErrorFields,
  fromPlainError,
  isErrorCode,
  SockpoolError,
  toPlainError,
} from '../shared/errors.js';
import { repoRoot } from './helpers/daemon.js';

function sourceFiles(dir: string): string[] {
  return readdirSync(join(repoRoot, dir), { recursive: true, encoding: 'utf8' })
    .filter((file) => /\.(ts|mjs|cc|h)$/.test(file))
    .map((file) => join(repoRoot, dir, file));
}

describe('the registry', () => {
  it('holds every SOCKPOOL_ERR_* code the daemon, client, worker, shared code and addon mention', () => {
    const mentioned = new Map<string, string>();
    for (const file of ['client', 'daemon', 'worker', 'shared', 'native'].flatMap(sourceFiles)) {
      for (const [code] of readFileSync(file, 'utf8').matchAll(/SOCKPOOL_ERR_[A-Z][A-Z_]*/g)) mentioned.set(code, file);
    }
    // Sanity: the scan sees the sources (the addon's own codes among them).
    expect(mentioned.get('SOCKPOOL_ERR_POLLER_CLOSED')).toMatch(/sockpool_native\.cc$/);
    const unregistered = [...mentioned]
      .filter(([code]) => !isErrorCode(code))
      .map(([code, file]) => `${code} in ${file}`);
    expect(unregistered).toEqual([]);
  });

  it('has one code per key, each SOCKPOOL_ERR_ plus the key', () => {
    for (const [key, code] of Object.entries(ErrorCodes)) expect(code).toBe(`SOCKPOOL_ERR_${key}`);
  });
});

describe('SockpoolError', () => {
  it('keeps a cause as the standard Error.cause, and copies fields onto the error', () => {
    const kernel = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:1'), { code: 'ECONNREFUSED' });
    const error = new SockpoolError(
      ErrorCodes.CONNECT,
      'cannot connect',
      { host: 'a.test', port: 1 },
      { cause: kernel },
    );
    expect(error.cause).toBe(kernel);
    expect(error).toMatchObject({ name: 'SockpoolError', code: 'SOCKPOOL_ERR_CONNECT', host: 'a.test', port: 1 });
  });

  it('never lets a field replace the error’s own properties', () => {
    // The type refuses these names; a value that gets past it (from JSON, say) is still not copied.
    const fields = { cause: 'ECONNREFUSED', code: 'X', message: 'm', name: 'n', extra: 1 } as unknown as ErrorFields;
    const error = new SockpoolError(ErrorCodes.CONNECT, 'cannot connect', fields, { cause: 'the real one' });
    expect(error.cause).toBe('the real one');
    expect(error.code).toBe('SOCKPOOL_ERR_CONNECT');
    expect(error.message).toBe('cannot connect');
    expect(error.name).toBe('SockpoolError');
    expect((error as unknown as { extra: number }).extra).toBe(1);
  });
});

describe('crossing a boundary', () => {
  it('a cause’s code goes along as causeCode and comes back as an Error.cause with that code', () => {
    const kernel = Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
    const plain = toPlainError(new SockpoolError(ErrorCodes.CONNECT, 'cannot connect', { port: 1 }, { cause: kernel }));
    expect(plain).toEqual({
      code: 'SOCKPOOL_ERR_CONNECT',
      message: 'cannot connect',
      fields: { port: 1, causeCode: 'ECONNREFUSED' },
    });
    const rebuilt = fromPlainError(JSON.parse(JSON.stringify(plain)));
    expect(rebuilt).toBeInstanceOf(SockpoolError);
    expect(rebuilt).toMatchObject({ code: 'SOCKPOOL_ERR_CONNECT', port: 1, causeCode: 'ECONNREFUSED' });
    expect(rebuilt.cause).toMatchObject({ code: 'ECONNREFUSED' });
  });

  it('a kernel failure keeps Node’s shape; anything without a code is SOCKPOOL_ERR_INTERNAL', () => {
    const kernel = Object.assign(new Error('connect ECONNREFUSED'), {
      code: 'ECONNREFUSED',
      syscall: 'connect',
      errno: -111,
    });
    const rebuilt = fromPlainError(toPlainError(kernel));
    expect(rebuilt).not.toBeInstanceOf(SockpoolError);
    expect(rebuilt).toMatchObject({
      code: 'ECONNREFUSED',
      syscall: 'connect',
      errno: -111,
      message: 'connect ECONNREFUSED',
    });
    expect(toPlainError(new Error('oops'))).toMatchObject({ code: ErrorCodes.INTERNAL, message: 'oops' });
    expect(toPlainError('a string')).toEqual({ code: ErrorCodes.INTERNAL, message: 'a string' });
  });
});
