import { LRUCache } from 'lru-cache';
import type { AuthorizationRequest, AuthorizationResult } from '../../registry/authorize.js';
import type { ChangeFeed } from './change-feed.js';
import { decisionKey, type LookupAsker, type LookupQueue } from './lookups.js';
import type { GatewayMetrics } from './metrics.js';

/** A decision and what it is worth: from the cache or the registry, read at which feed generation. */
export interface Decision {
  readonly result: AuthorizationResult;
  readonly cached: boolean;
  /** The feed generation when the lookup was asked; older than the feed's now means it may predate a change. */
  readonly generation: number;
  /**
   * performance.now() past which the row, its key or its delegation has expired. A tunnel's expiry
   * is armed from this, not from `result.validForMs`: that was measured when the registry answered,
   * and a cache hit (or a slow dial) comes later, so a timer armed from it would fire past not_after.
   */
  readonly expiresAt: number;
}

interface CachedDecision {
  readonly result: AuthorizationResult;
  readonly generation: number;
  /** performance.now() past which the row, its key or its delegation has expired. */
  readonly expiresAt: number;
}

export interface AuthoriserOptions {
  readonly enabled: boolean;
  readonly maxEntries: number;
}

/**
 * Decisions for CONNECTs and for re-checks of open tunnels (DESIGN §9b). Allowed decisions are
 * cached per (identity, SPKI, destination) until the earliest not_after of row, key and
 * delegation, and only while the change feed is confirmed; any change clears the cache, and a
 * decision read at an older feed generation is never cached. Denials are never cached.
 */
export class Authoriser {
  readonly #lookups: LookupQueue;
  readonly #feed: ChangeFeed;
  readonly #metrics: GatewayMetrics | undefined;
  readonly #cache: LRUCache<string, CachedDecision> | undefined;

  constructor(lookups: LookupQueue, feed: ChangeFeed, options: AuthoriserOptions, metrics: GatewayMetrics | undefined) {
    this.#lookups = lookups;
    this.#feed = feed;
    this.#metrics = metrics;
    this.#cache = options.enabled ? new LRUCache({ max: options.maxEntries }) : undefined;
    feed.on('change', () => this.#cache?.clear());
  }

  /** Settles once the registry notifications heard so far are answered (ChangeFeed.notificationsAnswered); undefined when none waits. */
  notificationsAnswered(): Promise<void> | undefined {
    return this.#feed.notificationsAnswered();
  }

  /** The decision was read at the feed's current generation: no registry change has overtaken it. */
  isCurrent(decision: Decision): boolean {
    return decision.generation === this.#feed.generation;
  }

  get cachedEntries(): number {
    return this.#cache?.size ?? 0;
  }

  /**
   * The cached decision for `request`, without waiting (no promise), counted as a hit; undefined
   * (counted as a miss or bypass) when lookUp must ask the registry. A CONNECT still waits for the
   * end of its read before dialling on it (connect.ts), as a lookup is sent only after it.
   */
  cached(request: AuthorizationRequest): Decision | undefined {
    const cache = this.#cache;
    if (!cache) return undefined;
    if (!this.#feed.confirmed) {
      this.#metrics?.cache('bypass');
      return undefined;
    }
    const generation = this.#feed.generation;
    const hit = cache.get(decisionKey(request));
    if (hit && hit.generation === generation && performance.now() < hit.expiresAt) {
      this.#metrics?.cache('hit');
      return { result: hit.result, cached: true, generation, expiresAt: hit.expiresAt };
    }
    this.#metrics?.cache('miss');
    return undefined;
  }

  /**
   * Asks the registry (through the lookup queue), and caches an allowed answer that is still
   * current. `recheck`: for open tunnels (LookupQueue.authorize).
   */
  async lookUp(request: AuthorizationRequest, signal: AbortSignal, asker?: LookupAsker, recheck = false): Promise<Decision> {
    const generation = this.#feed.generation;
    const cache = this.#cache;
    const result = await this.#lookups.authorize(request, signal, generation, asker, recheck);
    const expiresAt = performance.now() + (result.allowed ? result.validForMs : 0);
    if (cache && result.allowed && result.validForMs > 0 && this.#feed.confirmed && this.#feed.generation === generation) {
      cache.set(decisionKey(request), { result, generation, expiresAt });
    }
    return { result, cached: false, generation, expiresAt };
  }

  /** Many re-checks of open tunnels as one registry query (LookupQueue.authorizeMany); decisions in the order asked, cached like lookUp's. */
  async lookUpMany(requests: readonly AuthorizationRequest[]): Promise<Decision[]> {
    const generation = this.#feed.generation;
    const results = await this.#lookups.authorizeMany(requests);
    const now = performance.now();
    const current = this.#feed.confirmed && this.#feed.generation === generation;
    return results.map((result, i) => {
      const expiresAt = now + (result.allowed ? result.validForMs : 0);
      if (this.#cache && current && result.allowed && result.validForMs > 0) this.#cache.set(decisionKey(requests[i]!), { result, generation, expiresAt });
      return { result, cached: false, generation, expiresAt };
    });
  }
}
