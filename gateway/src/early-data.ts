import { constants as h2, type ServerHttp2Stream } from 'node:http2';
import { ByteHold } from './byte-hold.js';

/**
 * Client bytes that arrive on a CONNECT stream before its answer (DESIGN §9a: nothing a peer
 * sends may cost the gateway out of proportion). Node hands a stream's DATA to JavaScript up to
 * the stream's flow-control window whether or not anyone reads it, and replenishes the
 * connection window on its own; with the 1 MiB stream window the upload speed needs and 1,000
 * streams per session, one stranger's session whose lookups wait on a slow registry held ~60 MiB
 * in a test, and could hold a gigabyte. So those bytes are read as they arrive, copied into a
 * buffer of the stream's own (byte-hold.ts: what is counted is what is allocated), and held
 * within three bounds: per stream, per session, and per process, where peers the registry has
 * vouched for and strangers each have a share of their own (strangers filling theirs cannot get
 * an agent's optimistic CONNECT reset, and one granted key with many sessions cannot fill the
 * strangers' share, or more than its own). A stream past a bound is reset with ENHANCE_YOUR_CALM
 * (its CONNECT is recorded as `client_cancelled`, with the reason).
 *
 * A well-behaved client waits for the 200; an optimistic one sends a TLS ClientHello (≤ 16 KiB
 * + 5) or a request, far below the stream bound. What is held goes to the destination first
 * once the tunnel opens (through the SNI check); after a refusal, whatever still arrives is read
 * and dropped until the stream closes.
 */
export const EARLY_DATA_STREAM_BYTES = 64 * 1024;
/** Counted as allocated: a stream holding anything takes at least ByteHold.MIN_CAPACITY (1 KiB). */
export const EARLY_DATA_SESSION_BYTES = 1024 * 1024;
/** Per process, for each of the two classes of peer (vouched for, not): 128 MiB at most in all. */
export const EARLY_DATA_PROCESS_BYTES = 64 * 1024 * 1024;

/** Early bytes held by every CONNECT of the process, by class of peer. */
export class EarlyDataBudget {
  vouched = 0;
  strangers = 0;

  /** All of it (the `early_data_bytes` gauge). */
  get held(): number {
    return this.vouched + this.strangers;
  }
}

/** Where a session's share is counted (its PeerSession). */
export interface EarlyDataAccount {
  earlyDataBytes: number;
  /** The registry vouched for the peer (lookups.ts): which process share its bytes count against. */
  readonly vouched: boolean;
}

/** Told when a stream went past a bound and was reset. */
export interface EarlyDataOwner {
  earlyDataRefused(why: string): void;
}

/** What the client sent before the answer, handed to the tunnel. */
export interface EarlyBytes {
  /** Possibly empty. */
  readonly bytes: Buffer;
  /** The client also ended its half (END_STREAM) before the answer. */
  readonly ended: boolean;
}

/** The holder a stream belongs to, for the listeners every holder shares. */
const HOLDER = Symbol('agent-gateway.early-data');
type Carrier = ServerHttp2Stream & { [HOLDER]?: EarlyData | undefined };

/**
 * One CONNECT stream's bytes before its answer. Reading puts the stream in flowing mode:
 * release() pauses it again, so whoever takes over must resume it.
 */
export class EarlyData {
  readonly #stream: Carrier;
  readonly #account: EarlyDataAccount;
  readonly #budget: EarlyDataBudget;
  readonly #owner: EarlyDataOwner;
  /** Its capacity is what this stream has charged to its session and the process. */
  readonly #hold = new ByteHold(EARLY_DATA_STREAM_BYTES);
  /** The process share charged, fixed at the first charge (a session may be vouched for meanwhile). */
  #share: 'vouched' | 'strangers' | undefined;
  #ended = false;
  /** Refused or answered without a tunnel: bytes are read and dropped. */
  #dropping = false;
  #attached = true;

  constructor(stream: ServerHttp2Stream, account: EarlyDataAccount, budget: EarlyDataBudget, owner: EarlyDataOwner) {
    this.#stream = stream;
    this.#account = account;
    this.#budget = budget;
    this.#owner = owner;
    this.#stream[HOLDER] = this;
    stream.on('data', EarlyData.#onData);
    stream.on('end', EarlyData.#onEnd);
    stream.on('close', EarlyData.#onClose);
  }

  /** The tunnel takes over: what was held, and the stream paused with nothing listening. */
  release(): EarlyBytes {
    const early = { bytes: this.#hold.bytes(), ended: this.#ended };
    this.#stream.pause();
    this.#detach();
    this.#clear();
    return early;
  }

  /** No tunnel will come (a refusal): drop what is held, and read and drop the rest. */
  drop(): void {
    this.#dropping = true;
    this.#clear();
  }

  #clear(): void {
    this.#charge(-this.#hold.capacity);
    this.#hold.clear();
  }

  #charge(bytes: number): void {
    if (bytes === 0) return;
    this.#account.earlyDataBytes += bytes;
    this.#budget[this.#shareOf()] += bytes;
  }

  #shareOf(): 'vouched' | 'strangers' {
    return (this.#share ??= this.#account.vouched ? 'vouched' : 'strangers');
  }

  #detach(): void {
    if (!this.#attached) return;
    this.#attached = false;
    const stream = this.#stream;
    stream.removeListener('data', EarlyData.#onData);
    stream.removeListener('end', EarlyData.#onEnd);
    stream.removeListener('close', EarlyData.#onClose);
    // Assigned, not deleted: deleting would turn the stream's hidden class into a dictionary.
    stream[HOLDER] = undefined;
  }

  #take(chunk: Buffer): void {
    if (this.#dropping) return;
    const capacity = this.#hold.capacityFor(chunk.length);
    const growth = capacity === undefined ? 0 : capacity - this.#hold.capacity;
    const over =
      capacity === undefined
        ? `more than ${EARLY_DATA_STREAM_BYTES} bytes of DATA on the stream before the answer`
        : this.#account.earlyDataBytes + growth > EARLY_DATA_SESSION_BYTES
          ? `more than ${EARLY_DATA_SESSION_BYTES} bytes held for DATA before the answers on the session`
          : growth > 0 && this.#budget[this.#shareOf()] + growth > EARLY_DATA_PROCESS_BYTES
            ? `the gateway already holds ${EARLY_DATA_PROCESS_BYTES} bytes sent before answers by peers ${this.#shareOf() === 'vouched' ? 'vouched for' : 'not vouched for'}`
            : undefined;
    if (over) {
      this.drop();
      const stream = this.#stream;
      if (!stream.closed && !stream.destroyed) stream.close(h2.NGHTTP2_ENHANCE_YOUR_CALM);
      this.#owner.earlyDataRefused(over);
      return;
    }
    this.#hold.append(chunk);
    this.#charge(growth);
  }

  static #onData(this: Carrier, chunk: Buffer): void {
    const holder = this[HOLDER];
    if (holder) holder.#take(chunk);
  }

  static #onEnd(this: Carrier): void {
    const holder = this[HOLDER];
    if (holder) holder.#ended = true;
  }

  static #onClose(this: Carrier): void {
    const holder = this[HOLDER];
    if (!holder) return;
    holder.drop();
    holder.#detach();
  }
}
