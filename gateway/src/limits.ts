import { LRUCache } from 'lru-cache';

/**
 * Per-identity admission limits, checked after the identity and before the registry (DESIGN §3):
 * a token bucket on the CONNECT rate and a cap on concurrent tunnels. Pure and in-process: the
 * clock is injected, nothing here touches the network. With several gateway replicas each one
 * keeps its own counts (see README "Limits").
 *
 * The key is chosen by the caller. The gateway uses identity + SPKI fingerprint: the identity
 * string alone is not authenticated (any client can put any identity in its carrier
 * certificate), so keying on it alone would let a stranger spend another agent's budget.
 */
export interface LimitSettings {
  /** Tokens added per second; 0 = no rate limit. */
  readonly connect_rate_per_second: number;
  /** Bucket capacity (≥ 1). */
  readonly connect_burst: number;
  /** Concurrent admitted CONNECTs (deciding or tunnelling) per key; 0 = no cap. */
  readonly max_tunnels_per_identity: number;
}

export type AdmitResult =
  | { readonly ok: true; /** The caller holds a tunnel slot and must call release(key) once. */ readonly slot: boolean }
  | { readonly ok: false; readonly reason: 'rate_limited' | 'too_many_tunnels' };

// Shared answers: admission allocates nothing on the hot path.
const ADMITTED: AdmitResult = Object.freeze({ ok: true, slot: false });
const ADMITTED_WITH_SLOT: AdmitResult = Object.freeze({ ok: true, slot: true });
const RATE_LIMITED: AdmitResult = Object.freeze({ ok: false, reason: 'rate_limited' });
const TOO_MANY_TUNNELS: AdmitResult = Object.freeze({ ok: false, reason: 'too_many_tunnels' });

interface Bucket {
  tokens: number;
  /** Clock reading (ms) when `tokens` was last brought up to date. */
  at: number;
}

export interface LimiterOptions {
  /** Milliseconds, monotonic. Default performance.now. */
  readonly now?: () => number;
  /**
   * Most buckets kept. Evicting the least recently used one only forgets a partly spent bucket
   * (that identity starts full again), so memory stays bounded whatever clients send.
   */
  readonly maxTrackedIdentities?: number;
}

export const DEFAULT_MAX_TRACKED_IDENTITIES = 65_536;

export class Limiter {
  #settings: LimitSettings;
  readonly #now: () => number;
  readonly #buckets: LRUCache<string, Bucket>;
  /** Open slots per key. Never evicted (that would forget live tunnels); a key leaves at 0. */
  readonly #slots = new Map<string, number>();

  constructor(settings: LimitSettings, options: LimiterOptions = {}) {
    this.#settings = Limiter.#check(settings);
    this.#now = options.now ?? (() => performance.now());
    this.#buckets = new LRUCache({ max: options.maxTrackedIdentities ?? DEFAULT_MAX_TRACKED_IDENTITIES });
  }

  static #check(settings: LimitSettings): LimitSettings {
    const { connect_rate_per_second: rate, connect_burst: burst, max_tunnels_per_identity: max } = settings;
    if (!(rate >= 0) || !Number.isFinite(rate)) throw new RangeError(`connect_rate_per_second must be a finite number ≥ 0, got ${rate}`);
    if (!Number.isInteger(burst) || burst < 1) throw new RangeError(`connect_burst must be an integer ≥ 1, got ${burst}`);
    if (!Number.isInteger(max) || max < 0) throw new RangeError(`max_tunnels_per_identity must be an integer ≥ 0, got ${max}`);
    return Object.freeze({ connect_rate_per_second: rate, connect_burst: burst, max_tunnels_per_identity: max });
  }

  get settings(): LimitSettings {
    return this.#settings;
  }

  /**
   * Swaps the settings in one assignment (reload). Buckets keep their tokens, capped at the new
   * burst on their next use; open slots are kept, so a lowered cap refuses new tunnels until
   * enough old ones close. Throws on invalid settings and then changes nothing.
   */
  update(settings: LimitSettings): void {
    const next = Limiter.#check(settings);
    if (next.connect_rate_per_second === 0) this.#buckets.clear();
    this.#settings = next;
  }

  /** Rate first (every attempt spends a token), then the concurrency cap. */
  admit(key: string): AdmitResult {
    const settings = this.#settings;
    if (settings.connect_rate_per_second > 0 && !this.#takeToken(key, settings)) return RATE_LIMITED;
    const max = settings.max_tunnels_per_identity;
    if (max === 0) return ADMITTED;
    const open = this.#slots.get(key) ?? 0;
    if (open >= max) return TOO_MANY_TUNNELS;
    this.#slots.set(key, open + 1);
    return ADMITTED_WITH_SLOT;
  }

  /** Gives back a slot that admit() handed out (slot: true). */
  release(key: string): void {
    const open = this.#slots.get(key);
    if (open === undefined) return;
    if (open <= 1) this.#slots.delete(key);
    else this.#slots.set(key, open - 1);
  }

  /** Slots held by `key` (tests, diagnostics). */
  openSlots(key: string): number {
    return this.#slots.get(key) ?? 0;
  }

  get trackedBuckets(): number {
    return this.#buckets.size;
  }

  #takeToken(key: string, settings: LimitSettings): boolean {
    const now = this.#now();
    const burst = settings.connect_burst;
    const bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      this.#buckets.set(key, { tokens: burst - 1, at: now });
      return true;
    }
    const elapsed = Math.max(0, now - bucket.at);
    bucket.tokens = Math.min(burst, bucket.tokens + (elapsed * settings.connect_rate_per_second) / 1000);
    bucket.at = now;
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }
}
