// Whether the kernel can do TLS itself (TLS ULP, "kTLS"): logged at start. Nothing uses it yet: docs/warm-tls.md has
// the design for handing over sockets with kernel TLS installed, and nothing untested is built.
//
// /proc/sys/net/ipv4/tcp_available_ulp lists only the ULPs loaded now; the tls module can still be loaded on demand
// by the first setsockopt(TCP_ULP, "tls"). So the test is that setsockopt, on one end of a connected loopback pair
// made for the purpose (closed at once; nobody else ever sees it).
import { readFileSync } from 'node:fs';
import * as native from '../shared/native.js';

export interface KernelTls {
  available: boolean;
  /** Why not (the errno of setsockopt TCP_ULP "tls", e.g. ENOENT: no tls module), or 'ok'. */
  reason: string;
  /** What /proc/sys/net/ipv4/tcp_available_ulp listed before the test (loaded ULPs). */
  loadedUlps: string[];
}

export function detectKernelTls(): KernelTls {
  let loadedUlps: string[] = [];
  try {
    loadedUlps = readFileSync('/proc/sys/net/ipv4/tcp_available_ulp', 'utf8').trim().split(/\s+/).filter(Boolean);
  } catch {
    // No such file: a kernel without ULP support at all; setsockopt says so below.
  }
  let pair: [number, number];
  try {
    pair = native.loopbackPair();
  } catch (error) {
    return { available: false, reason: `no loopback pair: ${(error as Error).message}`, loadedUlps };
  }
  try {
    native.setTcpUlp(pair[0], 'tls');
    return { available: true, reason: 'ok', loadedUlps };
  } catch (error) {
    return { available: false, reason: (error as { code?: string }).code ?? (error as Error).message, loadedUlps };
  } finally {
    native.close(pair[0]);
    native.close(pair[1]);
  }
}
