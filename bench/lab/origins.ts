// The origins of the peers benchmark: host names, the address each is pinned to, URLs, and the crawler's request
// mix. Nobody resolves a name: the daemon gets `dns.resolve` entries, undici a `lookup` function, node-libcurl
// RESOLVE and the curl CLI --resolve, all from `pins()`. A name without a pin is a bug (it would go to DNS).
//
// Origin n (1-based) is at address <prefix><n>: 198.18.0.n in the lab (every address there is local in namespace
// `far`, so each origin is a separate host), 127.0.1.n on loopback. Its names:
// - `o<n>.lab` for the first-request scenario;
// - `o<n>.z<k>.lab` in zone k: each load run gets a zone of its own, so that the long-lived sockpool client (whose
//   worker threads keep curl's connection cache, as a crawler's would) never finds a connection from an earlier
//   run, and a zone sockpool did not announce is one sockpoold has never seen;
// - `w<n>.lab` for warm-up requests (JIT, TLS code, the workers' first transfers), never timed.
// The server certificate names the o<n>.lab and w<n>.lab hosts and `*.z<k>.lab` for each zone.

import { seededRandom } from '../../test/helpers/seeded-random.js';

export type Scheme = 'http' | 'https';

export interface OriginSetOptions {
  /** 'lab' (emulated round trip, namespace far) or 'loopback'. */
  name: 'lab' | 'loopback';
  /** Address of origin n is `${addressPrefix}${n}`. */
  addressPrefix: string;
  origins: number;
  warmupOrigins: number;
  /** Zones available to load runs (1..zones). */
  zones: number;
  httpPort: number;
  httpsPort: number;
}

export interface Pin {
  host: string;
  address: string;
}

export class OriginSet {
  readonly options: OriginSetOptions;

  constructor(options: OriginSetOptions) {
    this.options = options;
  }

  get name(): string {
    return this.options.name;
  }

  address(n: number): string {
    return `${this.options.addressPrefix}${n}`;
  }

  port(scheme: Scheme): number {
    return scheme === 'http' ? this.options.httpPort : this.options.httpsPort;
  }

  /** Origin n's name: in a zone of a load run, or (no zone) the first-request name. */
  host(n: number, zone?: number): string {
    if (zone === undefined) return `o${n}.lab`;
    if (zone < 1 || zone > this.options.zones) throw new Error(`zone ${zone} is not in 1..${this.options.zones}`);
    return `o${n}.z${zone}.lab`;
  }

  warmupHost(n: number): string {
    return `w${n}.lab`;
  }

  url(scheme: Scheme, host: string, path = '/'): string {
    return `${scheme}://${host}:${this.port(scheme)}${path}`;
  }

  /** Every name the benchmark uses, with its address. */
  pins(): Pin[] {
    const pins: Pin[] = [];
    for (let n = 1; n <= this.options.origins; n++) {
      pins.push({ host: this.host(n), address: this.address(n) });
      for (let zone = 1; zone <= this.options.zones; zone++) {
        pins.push({ host: this.host(n, zone), address: this.address(n) });
      }
    }
    for (let n = 1; n <= this.options.warmupOrigins; n++) {
      pins.push({ host: this.warmupHost(n), address: this.address(n) });
    }
    return pins;
  }

  /** sockpoold's `dns.resolve` entries (curl's --resolve syntax), for both ports. */
  resolveEntries(): string[] {
    return this.pins().flatMap((pin) =>
      (['http', 'https'] as const).map((scheme) => `${pin.host}:${this.port(scheme)}:${pin.address}`),
    );
  }

  /** Addresses the origin server must answer on when it cannot bind a wildcard (loopback). */
  addresses(): string[] {
    return Array.from({ length: this.options.origins }, (_, i) => this.address(i + 1));
  }
}

/** The names the server certificate must cover (wildcards for the zones). */
export function certificateNames(options: Pick<OriginSetOptions, 'origins' | 'warmupOrigins' | 'zones'>): string[] {
  const names: string[] = [];
  for (let n = 1; n <= options.origins; n++) names.push(`o${n}.lab`);
  for (let n = 1; n <= options.warmupOrigins; n++) names.push(`w${n}.lab`);
  for (let zone = 1; zone <= options.zones; zone++) names.push(`*.z${zone}.lab`);
  return names;
}

export { seededRandom };

/**
 * The crawler mix: `requests` origin numbers drawn from 1..origins with Zipf weights (origin k has weight 1/k),
 * in random order. The same seed gives the same list.
 */
export function zipfOrigins(origins: number, requests: number, seed: number): number[] {
  const random = seededRandom(seed);
  const cumulative: number[] = [];
  let total = 0;
  for (let k = 1; k <= origins; k++) {
    total += 1 / k;
    cumulative.push(total);
  }
  const picks: number[] = [];
  for (let i = 0; i < requests; i++) {
    const target = random() * total;
    let low = 0;
    let high = cumulative.length - 1;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (cumulative[mid]! < target) low = mid + 1;
      else high = mid;
    }
    picks.push(low + 1);
  }
  return picks;
}
