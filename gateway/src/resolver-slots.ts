/**
 * Names an identity may have being looked up at once (its CONNECTs to a name already being
 * looked up share that lookup). The system resolver (getaddrinfo) runs
 * on libuv's thread pool and cannot be cancelled: a name whose DNS never answers holds a thread
 * until the system resolver gives up (resolv.conf's timeout × attempts × servers, often 10 s and
 * more), long after its CONNECT stopped waiting at dial_timeout_ms. Lookups of one name share one
 * thread (egress.ts `coalesced`), but an agent authorised for a few names whose DNS is dead (its
 * own domain's servers, or an outage of a provider's) took every thread, and every other agent's
 * CONNECT to a hostname, and the log writes that share those threads, waited behind them.
 */
export const LOOKUPS_PER_IDENTITY = 4;

/**
 * libuv's thread pool for the gateway process unless the operator sets UV_THREADPOOL_SIZE (read
 * once, when the pool first starts: bin/agent-gateway.js sets it before anything runs). Four
 * identities, each at LOOKUPS_PER_IDENTITY dead names, still leave nothing for the fifth; sixteen
 * threads cost ~16 idle threads' stacks.
 */
export const GATEWAY_THREADPOOL_SIZE = 16;

/** Queue length past which waiters no longer wanted are dropped before another joins. */
const PRUNE_AT = 64;

interface Waiter {
  readonly name: string;
  readonly start: () => void;
  readonly join: (running: Promise<unknown>) => void;
  readonly wanted: () => boolean;
}

/**
 * At most `perKey` names being looked up per key (an identity); further ones wait, in order, for
 * one of that key's own to settle, so one identity's dead names cost only that identity. Lookups
 * of a name the key already has running share it and take no slot: they share its thread too
 * (egress.ts `coalesced`), and counted apart, a few CONNECTs to one dead name took every slot and
 * cut the identity off from all its other names. A lookup keeps its slot until the resolver
 * itself settles, not until its CONNECT stops waiting (that is what the thread does). A waiter
 * whose CONNECT no longer wants the answer when its turn comes is skipped without a lookup.
 */
export class ResolverSlots {
  readonly #perKey: number;
  /** Per key, the names being looked up and their shared lookup. */
  readonly #running = new Map<string, Map<string, Promise<unknown>>>();
  readonly #waiting = new Map<string, Waiter[]>();

  constructor(perKey: number = LOOKUPS_PER_IDENTITY) {
    this.#perKey = perKey;
  }

  /** Names being looked up for `key` (tests). */
  running(key: string): number {
    return this.#running.get(key)?.size ?? 0;
  }

  /** Lookups waiting for a slot of `key` (tests). */
  waiting(key: string): number {
    return this.#waiting.get(key)?.length ?? 0;
  }

  /**
   * Runs `lookup` of `name` in one of `key`'s slots, now or when one frees, or shares the one of
   * `name` that `key` already has running. `wanted` is asked when a waiter's turn comes; when it
   * says no, the lookup never starts and the promise rejects (its CONNECT has stopped listening).
   */
  run<T>(key: string, name: string, lookup: () => Promise<T>, wanted: () => boolean): Promise<T> {
    const shared = this.#running.get(key)?.get(name);
    if (shared) return shared as Promise<T>;
    return new Promise<T>((resolve, reject) => {
      const start = () => {
        let settled: Promise<T>;
        try {
          settled = lookup();
        } catch (error) {
          settled = Promise.reject(error as Error);
        }
        let names = this.#running.get(key);
        if (!names) this.#running.set(key, (names = new Map()));
        names.set(name, settled);
        settled.then(resolve, reject).finally(() => this.#release(key, name, settled));
      };
      if ((this.#running.get(key)?.size ?? 0) < this.#perKey) {
        start();
        return;
      }
      let queue = this.#waiting.get(key) ?? [];
      // Waiters whose CONNECT gave up leave only when a slot frees; a long queue is pruned of them
      // as it grows, so an identity firing CONNECTs at dead names holds at most what still waits.
      if (queue.length >= PRUNE_AT) queue = queue.filter((waiter) => waiter.wanted());
      queue.push({
        name,
        start,
        join: (running) => void (running as Promise<T>).then(resolve, reject),
        wanted: () => {
          if (wanted()) return true;
          reject(new Error('no longer wanted'));
          return false;
        },
      });
      this.#waiting.set(key, queue);
    });
  }

  #release(key: string, name: string, settled: Promise<unknown>): void {
    const names = this.#running.get(key);
    if (names?.get(name) === settled) names.delete(name);
    if (names?.size === 0) this.#running.delete(key);
    const queue = this.#waiting.get(key);
    if (!queue) return;
    // In order: the unwanted dropped, those whose name is running (again) share it, and the
    // rest start while slots are free.
    const kept: Waiter[] = [];
    for (const waiter of queue) {
      if (!waiter.wanted()) continue;
      const running = this.#running.get(key)?.get(waiter.name);
      if (running) waiter.join(running);
      else if ((this.#running.get(key)?.size ?? 0) < this.#perKey) waiter.start();
      else kept.push(waiter);
    }
    if (kept.length > 0) this.#waiting.set(key, kept);
    else this.#waiting.delete(key);
  }
}
