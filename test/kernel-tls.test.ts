// The daemon's kernel TLS (TLS ULP) detection: what it says agrees with the kernel, and sockpoold logs it at start.
// Whether the kernel has it depends on the machine (this one has none), so the test checks the answer against the
// kernel's own view rather than a fixed value: loaded ULPs that list "tls" mean it is there; "absent" must come
// with the kernel's refusal (ENOENT). Real sockets, a real daemon.
import { afterAll, describe, expect, it } from 'vitest';
import { detectKernelTls } from '../daemon/kernel-tls.js';
import { fdCount, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let daemon: DaemonProcess | undefined;

afterAll(async () => {
  await daemon?.stop();
});

describe('kernel TLS detection', () => {
  it('agrees with the kernel and leaves no fd behind', () => {
    const before = fdCount();
    const found = detectKernelTls();
    expect(fdCount()).toBe(before);
    if (found.loadedUlps.includes('tls')) expect(found).toMatchObject({ available: true, reason: 'ok' });
    if (!found.available) expect(found.reason).toBe('ENOENT');
    // Asked again, the same answer (a first setsockopt may have loaded the module: then both say available).
    expect(detectKernelTls().available).toBe(found.available);
  });

  it('is logged by sockpoold at start', async () => {
    daemon = await startTestDaemon([]);
    const ready = daemon
      .output()
      .split('\n')
      .filter((line) => line.includes('sockpoold ready'))
      .map((line) => JSON.parse(line) as { kernelTls?: unknown });
    expect(ready).toHaveLength(1);
    expect(ready[0]!.kernelTls).toEqual(detectKernelTls());
  });
});
