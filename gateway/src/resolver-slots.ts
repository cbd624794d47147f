/**
 * Hostname lookups an identity may have running at once. The system resolver (getaddrinfo) runs
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
  readonly start: () => void;
  readonly wanted: () => boolean;
}

/**
 * At most `perKey` lookups running per key (an identity); further ones wait, in order, for one of
 * that key's own to settle, so one identity's dead names cost only that identity. A lookup keeps
 * its slot until the resolver itself settles, not until its CONNECT stops waiting (that is what
 * the thread does). A waiter whose CONNECT no longer wants the answer when its turn comes is
 * skipped without a lookup.
 */
export class ResolverSlots {
  readonly #perKey: number;
  readonly #running = new Map<string, number>();
  readonly #waiting = new Map<string, Waiter[]>();

  constructor(perKey: number = LOOKUPS_PER_IDENTITY) {
    this.#perKey = perKey;
  }

  /** Lookups running for `key` (tests). */
  running(key: string): number {
    return this.#running.get(key) ?? 0;
  }

  /** Lookups waiting for a slot of `key` (tests). */
  waiting(key: string): number {
    return this.#waiting.get(key)?.length ?? 0;
  }

  /**
   * Runs `lookup` in one of `key`'s slots, now or when one frees. `wanted` is asked when a waiter's
   * turn comes; when it says no, the lookup never starts and the promise rejects (its CONNECT has
   * stopped listening by then).
   */
  run<T>(key: string, lookup: () => Promise<T>, wanted: () => boolean): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const start = () => {
        this.#running.set(key, (this.#running.get(key) ?? 0) + 1);
        let settled: Promise<T>;
        try {
          settled = lookup();
        } catch (error) {
          settled = Promise.reject(error as Error);
        }
        settled.then(resolve, reject).finally(() => this.#release(key));
      };
      if ((this.#running.get(key) ?? 0) < this.#perKey) {
        start();
        return;
      }
      let queue = this.#waiting.get(key) ?? [];
      // Waiters whose CONNECT gave up leave only when a slot frees; a long queue is pruned of them
      // as it grows, so an identity firing CONNECTs at dead names holds at most what still waits.
      if (queue.length >= PRUNE_AT) queue = queue.filter((waiter) => waiter.wanted());
      queue.push({
        start,
        wanted: () => {
          if (wanted()) return true;
          reject(new Error('no longer wanted'));
          return false;
        },
      });
      this.#waiting.set(key, queue);
    });
  }

  #release(key: string): void {
    const running = (this.#running.get(key) ?? 1) - 1;
    if (running === 0) this.#running.delete(key);
    else this.#running.set(key, running);
    const queue = this.#waiting.get(key);
    while (queue && queue.length > 0) {
      const next = queue.shift()!;
      if (queue.length === 0) this.#waiting.delete(key);
      if (next.wanted()) {
        next.start();
        return;
      }
    }
  }
}
