// The TLS files a configuration names (daemon/tls-sessions.ts readTlsFiles, at start and at every reload): each must
// hold what its key says, or the configuration is refused naming the key. A CA file with no certificate in it was
// taken: the daemon then trusted nothing, and every warm TLS handshake failed later with "unknown CA".
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../daemon/config.js';
import { readTlsFiles } from '../daemon/tls-sessions.js';
import { ErrorCodes } from '../shared/errors.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let paths: { ca: string; cert: string; key: string; text: string };
beforeAll(() => {
  pki = createTestPki(['localhost']);
  paths = {
    ca: pki.caFile,
    cert: join(pki.dir, 'client-cert.pem'),
    key: join(pki.dir, 'client-key.pem'),
    text: join(pki.dir, 'not-pem.txt'),
  };
  writeFileSync(paths.cert, pki.cert);
  writeFileSync(paths.key, pki.key);
  writeFileSync(paths.text, 'a host name, not a certificate\n');
});
afterAll(() => pki?.cleanup());

/** readTlsFiles of a configuration: 'ok', or the refusal's code and message. */
function read(raw: object): string {
  try {
    readTlsFiles(parseConfig(raw, 'test'));
    return 'ok';
  } catch (error) {
    return `${(error as { code?: string }).code}: ${(error as Error).message}`;
  }
}

describe('the TLS files a configuration names', () => {
  it('are taken when each holds what its key says', () => {
    expect(read({ tls: { caFile: paths.ca } })).toBe('ok');
    expect(
      read({
        pool: { origins: [{ match: 'a.example:443', caFile: paths.ca, clientCert: paths.cert, clientKey: paths.key }] },
      }),
    ).toBe('ok');
  });

  it('refuse a CA file with no certificate in it, naming the key, where every handshake would have failed later', () => {
    expect(read({ tls: { caFile: paths.text } })).toBe(
      `${ErrorCodes.CONFIG}: tls.caFile: ${paths.text} holds no PEM certificate`,
    );
    expect(read({ pool: { defaults: { caFile: paths.key } } })).toBe(
      `${ErrorCodes.CONFIG}: pool.defaults.caFile: ${paths.key} holds no PEM certificate`,
    );
  });

  it('refuse a client key file with no private key, and a key that is not the client certificate’s', () => {
    const origin = (clientCert: string, clientKey: string) =>
      read({ pool: { origins: [{ match: 'a.example:443', clientCert, clientKey }] } });
    expect(origin(paths.cert, paths.text)).toMatch(
      new RegExp(`^${ErrorCodes.CONFIG}: pool\\.origins\\[0\\]\\.clientKey: ${paths.text} holds no private key`),
    );
    expect(origin(paths.text, paths.key)).toBe(
      `${ErrorCodes.CONFIG}: pool.origins[0].clientCert: ${paths.text} holds no PEM certificate`,
    );
    // The CA's certificate with the server's key: a pair that does not go together.
    expect(origin(paths.ca, paths.key)).toBe(
      `${ErrorCodes.CONFIG}: pool.origins[0].clientKey: ${paths.key} is not the key of the certificate in ${paths.ca} (pool.origins[0].clientCert)`,
    );
  });
});
