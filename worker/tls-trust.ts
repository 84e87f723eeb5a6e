// What an https client tells the daemon it verifies against, so that the daemon hands it a warm TLS session only
// when the daemon's own check is exactly as strict (docs/warm-tls.md): `system` (the system store) or the SHA-256
// of the CA file's bytes. A client that skips verification, or goes through a proxy, says nothing: TCP only.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

export function tlsTrustOf(policy: {
  caFile?: string | undefined;
  insecure?: boolean | undefined;
  proxy?: unknown;
}): string | undefined {
  if (policy.insecure || policy.proxy) return undefined;
  if (policy.caFile === undefined) return 'system';
  try {
    return createHash('sha256').update(readFileSync(policy.caFile)).digest('hex');
  } catch {
    // Unreadable here: curl reports the CA file's problem itself, over a TCP socket.
    return undefined;
  }
}
