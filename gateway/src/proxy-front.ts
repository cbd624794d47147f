import { createServer, type Server, type Socket } from 'node:net';
import ipaddr from 'ipaddr.js';
import type { Logger } from 'pino';
import { inList, type Cidr } from './egress.js';
import { MAX_PROXY_V2_HEADER_BYTES, parseProxyV2, ProxyHeaderError, startsLikeProxyV1, startsLikeProxyV2, type ProxyRefusal } from './proxy-protocol.js';

/** Where a connection really comes from: the agent's address once a trusted balancer has said so. */
export interface ClientAddress {
  readonly address: string;
  readonly port: number;
  /** The balancer that relayed it (absent for a direct connection or a LOCAL header). */
  readonly via?: string;
}

export interface ProxyFrontOptions {
  /** `[server] proxy_protocol_from`: peers whose v2 header is trusted, and required. */
  readonly trusted: readonly Cidr[];
  /** The whole header must arrive within this (`[limits] handshake_timeout_ms`). */
  readonly timeoutMs: () => number;
  /** The connection, positioned at the client's first TLS byte. */
  readonly handOff: (socket: Socket) => void;
  readonly refused: (reason: ProxyRefusal) => void;
  /**
   * A peer not in the list sent nothing by the deadline ('timeout') or closed first ('error'): no
   * header was owed, so this is a TLS handshake that failed, told as the TLS server tells one when
   * no balancer is configured.
   */
  readonly handshakeFailed: (reason: 'timeout' | 'error', code: string, message: string) => void;
  readonly log: Logger;
}

type Endpoints = { remoteAddress?: string | undefined; remotePort?: number | undefined; localAddress?: string | undefined; localPort?: number | undefined };

/**
 * Key of an accepted TCP connection (the TLS socket over it reports the same endpoints): both
 * ends, since one balancer address and port can hold connections to two of our addresses at once
 * (a listener on 0.0.0.0), and keyed by the peer alone the second header was read for both.
 */
function endpointKey(socket: Endpoints): string {
  return `${socket.remoteAddress}|${socket.remotePort}|${socket.localAddress}|${socket.localPort}`;
}

function inRanges(text: string | undefined, ranges: readonly Cidr[]): boolean {
  if (!text) return false;
  let address: ipaddr.IPv4 | ipaddr.IPv6;
  try {
    address = ipaddr.process(text);
  } catch {
    return false;
  }
  return inList(address, ranges) !== undefined;
}

/**
 * The gateway's TCP listener when `[server] proxy_protocol_from` is set (DESIGN §9g): reads the
 * PROXY v2 header before TLS, then hands the connection to the TLS server. A listed balancer must
 * send a valid v2 header; anyone else sending one (or v1) is refused on their first byte, which
 * can never start a TLS record. Every wait is bounded by the handshake deadline and by
 * MAX_PROXY_V2_HEADER_BYTES, and a refused connection is destroyed at once.
 */
export class ProxyFront {
  readonly server: Server;
  readonly #options: ProxyFrontOptions;
  /** Accepted connections still open → the client they carry. */
  readonly #clients = new Map<string, ClientAddress>();

  constructor(options: ProxyFrontOptions) {
    this.#options = options;
    this.server = createServer((socket) => this.#accept(socket));
  }

  /** The client behind a connection the TLS server is handling (by its peer endpoint). */
  clientOf(socket: Endpoints): ClientAddress | undefined {
    return this.#clients.get(endpointKey(socket));
  }

  /** Connections handed to TLS and still open (tests: nothing outlives its peer). */
  get tracked(): number {
    return this.#clients.size;
  }

  #accept(socket: Socket): void {
    const source = socket.remoteAddress;
    const key = endpointKey(socket);
    const trusted = inRanges(source, this.#options.trusted);
    let received: Buffer = Buffer.alloc(0);
    let settled = false;
    const cleanup = () => {
      settled = true;
      clearTimeout(deadline);
      socket.removeListener('readable', onReadable);
      socket.removeListener('end', onEnd);
      socket.removeListener('close', onEnd);
    };
    const refuse = (reason: ProxyRefusal, message: string) => {
      if (settled) return;
      cleanup();
      this.#options.refused(reason);
      // Debug, like failed TLS handshakes: anyone reaching the port could fill the log; the metric counts.
      this.#options.log.debug({ event: 'proxy_protocol_refused', reason, peer: source, err: message }, 'connection refused before TLS');
      socket.destroy();
    };
    const handOff = (client: ClientAddress, rest: Buffer) => {
      cleanup();
      this.#clients.set(key, client);
      // Only its own entry: the balancer may reuse the port for a new connection before this 'close'.
      socket.once('close', () => {
        if (this.#clients.get(key) === client) this.#clients.delete(key);
      });
      if (rest.length > 0) socket.unshift(rest);
      this.#options.handOff(socket);
    };
    const onEnd = () => {
      if (trusted) {
        refuse('truncated', `the peer closed after ${received.length} bytes`);
        return;
      }
      notTls('error', 'ECONNRESET', 'the peer closed before the TLS handshake');
    };
    const notTls = (reason: 'timeout' | 'error', code: string, message: string) => {
      if (settled) return;
      cleanup();
      this.#options.handshakeFailed(reason, code, message);
      socket.destroy();
    };
    const onReadable = () => {
      let chunk: Buffer | null;
      while (!settled && (chunk = socket.read() as Buffer | null) !== null) {
        if (!trusted) {
          // One byte decides: a TLS record starts 0x16, a v2 header 0x0D, a v1 header 'P'.
          if (startsLikeProxyV2(chunk) || startsLikeProxyV1(chunk)) refuse('untrusted_source', `PROXY header from ${source}, which is not in proxy_protocol_from`);
          else handOff({ address: source ?? '', port: socket.remotePort ?? 0 }, chunk);
          return;
        }
        received = received.length === 0 ? chunk : Buffer.concat([received, chunk]);
        try {
          const result = parseProxyV2(received.subarray(0, MAX_PROXY_V2_HEADER_BYTES));
          if (!result.done) continue;
          const rest = received.subarray(result.length);
          const header = result.header;
          // LOCAL: the balancer speaks for itself (a health check); the connection is its own.
          handOff(header.command === 'local' ? { address: source ?? '', port: socket.remotePort ?? 0 } : { address: header.source.address, port: header.source.port, via: source ?? '' }, rest);
        } catch (error) {
          if (error instanceof ProxyHeaderError) refuse(error.reason, error.message);
          else throw error;
        }
      }
    };
    // Errors after hand-off belong to the TLS layer; before it, any error just ends the attempt.
    socket.on('error', () => socket.destroy());
    socket.on('readable', onReadable);
    socket.on('end', onEnd);
    // A reset (or any error) closes without 'end': let go of it now, not at the deadline.
    socket.on('close', onEnd);
    const deadline = setTimeout(() => {
      if (trusted) {
        refuse(received.length > 0 ? 'truncated' : 'timeout', `no complete header within ${this.#options.timeoutMs()} ms`);
        return;
      }
      notTls('timeout', 'ERR_TLS_HANDSHAKE_TIMEOUT', 'TLS handshake timeout');
    }, this.#options.timeoutMs());
    deadline.unref();
  }
}
