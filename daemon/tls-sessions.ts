// Warm TLS: which origins get TLS sessions completed ahead of need, what they trust, and the connector that makes
// them. A warm TLS session looks to the origin pool like any other socket: its fd is one end of a loopback TCP
// connection whose other end a relay thread (tls-relay.ts) joins to the TLS connection. So the pool's warming, liveness
// (the relay ends the pair when the server closes the session), learned idle lifetime and leases apply unchanged;
// only the pool key differs (`host:port tls`), so that clients that verify differently keep plain TCP sockets.
//
// Never a weaker check than asked: a client gets a relayed session only when what it would trust (the system
// store, or the SHA-256 of its CA file) is exactly what the daemon trusts for that origin. A client that turned
// verification off, or trusts another CA file, sends no `tls` field or another trust, and gets a TCP socket.

import type { Buffer } from 'node:buffer';
import { createHash, createPrivateKey, type KeyObject, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { OriginMatch } from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { Origin } from '../shared/origin.js';
import { type OriginPolicy, originMatches, policyFor, type SockpoolConfig } from './config.js';
import type { ConnectedSocket, Connector } from './connector.js';
import type { TlsRelays } from './tls-relay.js';

/** What a client's acquire says about its TLS: `system` or the SHA-256 (hex) of the CA file it verifies with. */
export type TlsTrust = string;
export const SYSTEM_TRUST: TlsTrust = 'system';

// (A warm TLS pool's key and its test live with the other key formats: shared/origin.ts.)
export { isTlsPoolKey, tlsPoolKey } from '../shared/origin.js';

interface PemFile {
  text: string;
  sha256: string;
}

/** The CA, certificate and key files a configuration names, by path, as read by readTlsFiles. */
export type TlsFiles = ReadonlyMap<string, PemFile>;

/**
 * Reads every CA, certificate and key file the configuration names, and checks each holds what its key says (a CA
 * file a certificate at least, a key file a private key, a client certificate the key named beside it); SOCKPOOL_ERR_CONFIG
 * naming one it cannot read or that holds something else. Unchecked, a CA file with no certificate made the daemon
 * trust nothing: every warm TLS handshake failed with "unknown CA", long after the start or reload said nothing.
 */
export function readTlsFiles(config: SockpoolConfig): TlsFiles {
  const files = new Map<string, PemFile>();
  const read = (path: string | undefined, key: string): string | undefined => {
    if (path === undefined) return undefined;
    const known = files.get(path);
    if (known) return known.text;
    let bytes: Buffer;
    try {
      bytes = readFileSync(path);
    } catch (error) {
      const code = (error as { code?: string }).code ?? 'EIO';
      throw new SockpoolError(ErrorCodes.CONFIG, `${key}: cannot read ${path} (${code})`, { key, source: path });
    }
    const text = bytes.toString('utf8');
    files.set(path, { text, sha256: createHash('sha256').update(bytes).digest('hex') });
    return text;
  };
  const caFile = config.tls.caFile;
  if (caFile !== undefined) certificatesIn(read(caFile, 'tls.caFile')!, 'tls.caFile', caFile);
  for (const [index, policy] of [config.pool.defaults, ...config.pool.origins].entries()) {
    const where = index === 0 ? 'pool.defaults' : `pool.origins[${index - 1}]`;
    if (policy.caFile !== undefined)
      certificatesIn(read(policy.caFile, `${where}.caFile`)!, `${where}.caFile`, policy.caFile);
    const cert = policy.clientCert;
    const key = policy.clientKey;
    const certs =
      cert === undefined ? undefined : certificatesIn(read(cert, `${where}.clientCert`)!, `${where}.clientCert`, cert);
    const privateKey =
      key === undefined ? undefined : privateKeyIn(read(key, `${where}.clientKey`)!, `${where}.clientKey`, key);
    if (certs && privateKey && !certs[0]!.checkPrivateKey(privateKey)) {
      throw new SockpoolError(
        ErrorCodes.CONFIG,
        `${where}.clientKey: ${key} is not the key of the certificate in ${cert} (${where}.clientCert)`,
        { key: `${where}.clientKey`, source: key },
      );
    }
  }
  return files;
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/** The PEM certificates in a file's text, the first first; SOCKPOOL_ERR_CONFIG naming `key` when none parses. */
function certificatesIn(text: string, key: string, path: string): X509Certificate[] {
  const certificates: X509Certificate[] = [];
  for (const [block] of text.matchAll(PEM_CERTIFICATE)) {
    try {
      certificates.push(new X509Certificate(block));
    } catch {
      // (A bundle with one block OpenSSL cannot read is still a bundle: the others are trusted.)
    }
  }
  if (certificates.length === 0) {
    throw new SockpoolError(ErrorCodes.CONFIG, `${key}: ${path} holds no PEM certificate`, { key, source: path });
  }
  return certificates;
}

/** The private key in a file's text; SOCKPOOL_ERR_CONFIG naming `key` when there is none (or it is encrypted). */
function privateKeyIn(text: string, key: string, path: string): KeyObject {
  try {
    return createPrivateKey(text);
  } catch (error) {
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `${key}: ${path} holds no private key the daemon can use (${(error as Error).message})`,
      { key, source: path },
    );
  }
}

export class TlsSessions implements Connector {
  #config!: SockpoolConfig;
  #files: TlsFiles = new Map();
  #warmAll = false;
  #warm: readonly OriginMatch[] = [];
  #tcp: Connector;
  #relays: TlsRelays;

  constructor(config: SockpoolConfig, tcp: Connector, relays: TlsRelays) {
    this.#tcp = tcp;
    this.#relays = relays;
    this.configure(config);
  }

  /**
   * Takes the files of a configuration (start and reload): read here unless `files` (readTlsFiles) were read before,
   * as a reload does so that nothing can fail once it has started to swap its configuration in.
   */
  configure(config: SockpoolConfig, files: TlsFiles = readTlsFiles(config)): void {
    this.#files = files;
    this.#warmAll = config.tls.warm.some((match) => match.text === '*');
    this.#warm = config.tls.warm;
    this.#config = config;
  }

  /**
   * Whether an acquire for `origin` gets a relayed TLS session: warm TLS is on for it and the client trusts
   * exactly what the daemon trusts there. Proxied origins never (the tunnel is the client's business).
   */
  relays(origin: Origin, policy: OriginPolicy, clientTrust: TlsTrust | undefined): boolean {
    if (clientTrust === undefined || origin.proxy) return false;
    if (!this.enabled(origin, policy)) return false;
    return clientTrust === this.trustOf(policy);
  }

  enabled(origin: Origin, policy: OriginPolicy): boolean {
    if (policy.warmTls || this.#warmAll) return true;
    return this.#warm.some((match) => originMatches(match, origin.host, origin.port));
  }

  /** What the daemon verifies an origin's certificate against. */
  trustOf(policy: OriginPolicy): TlsTrust {
    return this.#filesOf(policy).ca?.sha256 ?? SYSTEM_TRUST;
  }

  /**
   * Names what a session of this policy is verified against and presents: the SHA-256s of the CA file (or the
   * system store) and of the client certificate and key, as read at the last start or reload.
   */
  credentialsOf(policy: OriginPolicy): string {
    const { cert, key } = this.#filesOf(policy);
    return `${this.trustOf(policy)}/${cert?.sha256 ?? '-'}/${key?.sha256 ?? '-'}`;
  }

  /**
   * Whether `socket` may go to a client that asked for `clientTrust`: a TCP socket always (the client does its own
   * TLS), a relayed session only when it was verified against exactly that trust. An acquire picks its pool by the
   * trust in force when it arrives; one waiting there across a reload that changed the trust would otherwise be
   * handed a session verified against what it never asked for (PoolManager.acquire asks before every handoff).
   */
  verifiedFor(socket: ConnectedSocket, clientTrust: TlsTrust | undefined): boolean {
    const credentials = socket.tlsCredentials;
    if (credentials === undefined) return socket.tls === undefined;
    // (credentialsOf's first field; a trust, a digest or `system`, holds no '/'.)
    return clientTrust !== undefined && credentials.slice(0, credentials.indexOf('/')) === clientTrust;
  }

  /** The CA file (undefined: the system store), client certificate and key of a policy, as last read. */
  #filesOf(policy: OriginPolicy): { ca?: PemFile | undefined; cert?: PemFile | undefined; key?: PemFile | undefined } {
    const file = (path: string | undefined) => (path === undefined ? undefined : this.#files.get(path));
    return {
      ca: file(policy.caFile ?? this.#config.tls.caFile),
      cert: file(policy.clientCert),
      key: file(policy.clientKey),
    };
  }

  /**
   * Whether a session made before a reload no longer matches what the configuration now in force would verify
   * against or present for its origin (a CA file or client certificate changed): it must not be handed out, as a
   * client trusting the new CA would get a session verified against the old one.
   */
  stale(origin: Origin, socket: ConnectedSocket): boolean {
    if (socket.tlsCredentials === undefined) return false;
    return socket.tlsCredentials !== this.credentialsOf(policyFor(this.#config, origin.host, origin.port));
  }

  checkTarget(origin: Origin): void {
    this.#tcp.checkTarget(origin);
  }

  /** A warm session's TCP connection is checked like any other (its `address` is the origin's). */
  checkHeld(origin: Origin, address: string): void {
    this.#tcp.checkHeld(origin, address);
  }

  /**
   * A TCP connect, then the handshake in a relay thread (queued there as at the connect gate: `urgent()` first,
   * fairly across uids, not started once no longer `wanted()`): the fd returned is the daemon's end of the pair.
   * The handshake verifies against the configuration in force when it starts, whatever was in force when the
   * connect began; a reload it overtakes makes it start over (see `stale`), or fails it with SOCKPOOL_ERR_POLICY
   * when the egress policy now refuses the origin or its address.
   */
  async connect(
    origin: Origin,
    policy: OriginPolicy,
    urgent?: () => boolean,
    wanted?: () => boolean,
    uid?: number,
  ): Promise<ConnectedSocket> {
    const startedAt = performance.now();
    const atStart = this.#config;
    const socket = await this.#tcp.connect(origin, policy, urgent, wanted, uid);
    // A reload during the lookup or the TCP connect: `policy` is the origin's entry of before, so the handshake
    // takes the origin's entry from the configuration now in force (its CA file, its client certificate).
    const configured = this.#config;
    if (configured !== atStart) policy = policyFor(configured, origin.host, origin.port);
    const { ca, cert, key } = this.#filesOf(policy);
    const credentials = this.credentialsOf(policy);
    // From here the relay owns the TCP fd (open() takes it at once, failure or not).
    const session = await this.#relays.open(
      socket.fd,
      {
        host: origin.host,
        port: origin.port,
        ca: ca?.text,
        cert: cert?.text,
        key: key?.text,
        contextKey: credentials,
        timeoutMs: this.#config.tls.handshakeTimeoutMs,
      },
      urgent,
      wanted,
      uid,
    );
    const connectedAt = performance.now();
    const made: ConnectedSocket = {
      fd: session.fd,
      address: socket.address,
      family: socket.family,
      connectedAt,
      startedAt,
      connectMs: socket.connectMs + session.handshakeMs,
      tls: session.info,
      tlsCredentials: credentials,
      relayThread: session.relayThread,
      relaySession: session.relaySession,
    };
    // A reload during the handshake that changed what this origin's sessions are verified against: start over
    // with the configuration in force (the session is ours until returned), still abandoned once not wanted.
    if (this.stale(origin, made)) {
      native.close(made.fd);
      return this.connect(origin, policyFor(this.#config, origin.host, origin.port), urgent, wanted, uid);
    }
    // A reload during the handshake: the TCP connector judged the connection by the egress policy of before; the
    // one in force now judges it, as it judges the sockets held at a reload.
    if (this.#config !== configured) {
      try {
        this.checkHeld(origin, made.address);
      } catch (error) {
        native.close(made.fd);
        throw error;
      }
    }
    return made;
  }
}
