import type { AuthorizationRequest, AuthorizationResult } from '../../registry/authorize.js';
import { RegistryUnavailableError } from '../../registry/errors.js';

/** One key per (identity, SPKI, destination): what a decision is about (lookups and the cache). */
export function decisionKey(request: AuthorizationRequest): string {
  return `${request.identity}\n${Buffer.from(request.spkiDer).toString('base64')}\n${request.destination}`;
}

/** What runs one lookup (RegistryClient.authorize, bound). */
export type LookupFn = (request: AuthorizationRequest) => Promise<AuthorizationResult>;

export interface LookupQueueOptions {
  /** Lookups running at once: the pool size, so a started lookup never waits for a connection. */
  readonly concurrency: number;
  /** Distinct lookups waiting to start; past it a CONNECT gets 503 at once. */
  readonly maxQueued: number;
  /** Longest a lookup may wait to start before its CONNECTs get 503 (`pool_acquire_timeout_ms`). */
  readonly maxWaitMs: number;
}

/** A lookup's caller went away; the caller records `client_cancelled`, never a 503. */
export class LookupCancelledError extends Error {
  constructor() {
    super('the CONNECT was cancelled before its lookup finished');
    this.name = 'LookupCancelledError';
  }
}

interface Waiter {
  readonly resolve: (result: AuthorizationResult) => void;
  readonly reject: (error: unknown) => void;
  readonly signal: AbortSignal;
  readonly onAbort: () => void;
}

interface Job {
  readonly key: string;
  readonly request: AuthorizationRequest;
  readonly enqueuedAt: number;
  readonly waiters: Set<Waiter>;
  started: boolean;
  /** Still counted in #waiting. */
  counted: boolean;
}

/**
 * Registry work in proportion to what clients spend (DESIGN §9a):
 * - identical lookups in flight (same identity, key and destination) share one query;
 * - a lookup starts only when a pooled connection is free, after the current burst of frames has
 *   been read (setImmediate), so a stream reset in the same packet as its HEADERS never reaches
 *   PostgreSQL, and a lookup whose CONNECTs are all gone before it starts is dropped;
 * - waiting is bounded in count (`maxQueued`: 503 at once when full) and in time (`maxWaitMs`).
 * Denials are shared only while in flight; nothing is remembered after a lookup settles.
 */
export class LookupQueue {
  readonly #lookup: LookupFn;
  readonly #options: LookupQueueOptions;
  readonly #inFlight = new Map<string, Job>();
  readonly #queue: Job[] = [];
  #queueHead = 0;
  #running = 0;
  /** Unstarted jobs with a waiter (the bound applies to these, not to abandoned ones). */
  #waiting = 0;
  #expiryTimer: NodeJS.Timeout | undefined;
  #pumpScheduled = false;
  /** Queries actually sent (tests, metrics). */
  #started = 0;

  constructor(lookup: LookupFn, options: LookupQueueOptions) {
    this.#lookup = lookup;
    this.#options = options;
  }

  /** Lookups waiting to start that someone still waits for. */
  get queued(): number {
    return this.#waiting;
  }

  get running(): number {
    return this.#running;
  }

  get started(): number {
    return this.#started;
  }

  /**
   * The decision for `request`, shared with identical lookups in flight asked at the same change-
   * feed `generation`. Rejects with
   * LookupCancelledError when `signal` fires first, RegistryUnavailableError when the queue is
   * full, the wait too long or the registry cannot be asked.
   */
  authorize(request: AuthorizationRequest, signal: AbortSignal, generation = 0): Promise<AuthorizationResult> {
    if (signal.aborted) return Promise.reject(new LookupCancelledError());
    // The generation keeps a lookup asked after a registry change from joining one asked before it.
    const key = `${generation}\n${decisionKey(request)}`;
    let job = this.#inFlight.get(key);
    if (!job) {
      if (this.queued >= this.#options.maxQueued) {
        return Promise.reject(new RegistryUnavailableError(`registry lookup queue is full (${this.#options.maxQueued} waiting)`));
      }
      job = { key, request, enqueuedAt: performance.now(), waiters: new Set(), started: false, counted: true };
      this.#inFlight.set(key, job);
      this.#queue.push(job);
      this.#waiting++;
      this.#schedulePump();
      this.#armExpiry();
    }
    const owner = job;
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        signal,
        onAbort: () => {
          owner.waiters.delete(waiter);
          reject(new LookupCancelledError());
          // Nobody left to answer: a job that has not started never will.
          if (!owner.started && owner.waiters.size === 0) {
            this.#inFlight.delete(owner.key);
            this.#uncount(owner);
          }
        },
      };
      owner.waiters.add(waiter);
      signal.addEventListener('abort', waiter.onAbort, { once: true });
    });
  }

  #schedulePump(): void {
    if (this.#pumpScheduled) return;
    this.#pumpScheduled = true;
    setImmediate(() => {
      this.#pumpScheduled = false;
      this.#pump();
    });
  }

  #pump(): void {
    const now = performance.now();
    while (this.#running < this.#options.concurrency && this.#queueHead < this.#queue.length) {
      const job = this.#queue[this.#queueHead++]!;
      if (job.waiters.size === 0) continue; // every CONNECT behind it is gone
      if (now - job.enqueuedAt > this.#options.maxWaitMs) {
        this.#expire(job);
        continue;
      }
      this.#uncount(job);
      job.started = true;
      this.#running++;
      this.#started++;
      this.#lookup(job.request).then(
        (result) => this.#settle(job, result, undefined),
        (error: unknown) => this.#settle(job, undefined, error),
      ).finally(() => {
        this.#running--;
        this.#schedulePump();
      });
    }
    // Compact the array now and then rather than shift() per job.
    if (this.#queueHead > 1024 && this.#queueHead * 2 > this.#queue.length) {
      this.#queue.splice(0, this.#queueHead);
      this.#queueHead = 0;
    }
  }

  #uncount(job: Job): void {
    if (!job.counted) return;
    job.counted = false;
    this.#waiting--;
  }

  #expire(job: Job): void {
    this.#uncount(job);
    this.#settle(job, undefined, new RegistryUnavailableError(`registry lookup waited more than ${this.#options.maxWaitMs} ms for a connection`));
  }

  /**
   * Waits are bounded even while no lookup finishes (a hung database): jobs past maxWaitMs are
   * failed on a timer, not only when a running lookup frees a slot.
   */
  #armExpiry(): void {
    if (this.#expiryTimer) return;
    this.#expiryTimer = setTimeout(() => {
      this.#expiryTimer = undefined;
      const now = performance.now();
      for (let i = this.#queueHead; i < this.#queue.length; i++) {
        const job = this.#queue[i]!;
        if (job.started || !job.counted) continue;
        if (now - job.enqueuedAt <= this.#options.maxWaitMs) break; // FIFO: the rest are younger
        this.#expire(job);
      }
      if (this.#waiting > 0) this.#armExpiry();
    }, this.#options.maxWaitMs);
  }

  #settle(job: Job, result: AuthorizationResult | undefined, error: unknown): void {
    if (this.#inFlight.get(job.key) === job) this.#inFlight.delete(job.key);
    for (const waiter of job.waiters) {
      waiter.signal.removeEventListener('abort', waiter.onAbort);
      if (result) waiter.resolve(result);
      else waiter.reject(error);
    }
    job.waiters.clear();
  }
}
