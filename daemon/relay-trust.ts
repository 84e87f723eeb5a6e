// What a relay thread's handshakes trust when the client asked for the system store (trust "system": no caFile):
// the operating system's roots, the ones the client's curl verifies against (libcurl's CA file and path on this
// host), not Node's bundled Mozilla list, which createSecureContext uses when given no `ca`. The two differ (on a
// Debian host each holds roots the other lacks): a session verified against roots the client's store lacks, or
// one an administrator took out of it, would be lent as if verified "as the client asked".
//
// Read once per relay thread, at its first such handshake (a few hundred certificates parsed): a change to the
// system store reaches the relay threads started after it (a restart; a thread replaced).
import { getCACertificates } from 'node:tls';

let systemRoots: string[] | undefined;

/** The `ca` of a relay handshake: the configured CA file's text, or the system store's roots for trust "system". */
export function relayCa(configured: string | undefined): string | string[] {
  if (configured !== undefined) return configured;
  systemRoots ??= getCACertificates('system');
  return systemRoots;
}
