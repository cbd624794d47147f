import type { AuthorizationRequest, AuthorizationResult } from '../../registry/authorize.js';
import { RegistryUnavailableError } from '../../registry/errors.js';

/** Each key's text, made once per parsed certificate (a session's CONNECTs share its key bytes). */
const spkiTexts = new WeakMap<Uint8Array, string>();

function spkiText(der: Uint8Array): string {
  let text = spkiTexts.get(der);
  if (text === undefined) spkiTexts.set(der, (text = Buffer.from(der.buffer, der.byteOffset, der.byteLength).toString('base64')));
  return text;
}

/** One key per (identity, SPKI, destination): what a decision is about (lookups and the cache). */
export function decisionKey(request: AuthorizationRequest): string {
  return `${request.identity}\n${spkiText(request.spkiDer)}\n${request.destination}`;
}

/** What runs one lookup (RegistryClient.authorize, bound). */
export type LookupFn = (request: AuthorizationRequest) => Promise<AuthorizationResult>;

/** What runs many lookups as one query on one connection, answers in the order asked (RegistryClient.authorizeMany, bound). */
export type LookupManyFn = (requests: readonly AuthorizationRequest[]) => Promise<AuthorizationResult[]>;

/** A job's answer: one decision, or a batch's, in the order asked. */
type JobResult = AuthorizationResult | readonly AuthorizationResult[];

const NEVER_ABORTED = new AbortController().signal;

export interface LookupQueueOptions {
  /** Lookups running at once: the pool size, so a started lookup never waits for a connection. */
  readonly concurrency: number;
  /**
   * Distinct lookups waiting to start, i.e. for a connection (those running or given one do not
   * count); past it a CONNECT gets 503 at once.
   */
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
  readonly resolve: (result: JobResult) => void;
  readonly reject: (error: unknown) => void;
  readonly signal: AbortSignal;
  readonly onAbort: () => void;
}

/**
 * Where a job is. `waiting`: in one of the two queues, counted against the bounds (#waiting and,
 * while not vouched for, #waitingStrangers and its session's count). `starting`: given a free
 * connection (counted in #running), sent when the current read is over unless its CONNECTs are
 * all gone first. `running`: sent. `done`: abandoned or expired before it was sent.
 */
type JobState = 'waiting' | 'starting' | 'running' | 'done';

interface Job {
  readonly key: string;
  readonly request: AuthorizationRequest;
  /** A batch's requests (authorizeMany): `request` is then its first, and nobody shares the job. */
  readonly batch?: readonly AuthorizationRequest[];
  readonly enqueuedAt: number;
  readonly waiters: Set<Waiter>;
  state: JobState;
  /**
   * Asked for a peer the registry has vouched for (or a re-check of an open tunnel). Changes only
   * while `waiting` (a move-up), so from `starting` on it also says whose connection the job holds.
   */
  vouched: boolean;
  /** The session a stranger's job counts against while it waits. */
  readonly asker: LookupAsker | undefined;
}

/**
 * Who asks, when it is a CONNECT: its session. `vouched`: the registry has vouched for the peer
 * (a CONNECT of its identity and key was allowed since the last registry change); its
 * `strangerLookupsWaiting` is kept here.
 */
export interface LookupAsker {
  readonly vouched: boolean;
  strangerLookupsWaiting: number;
}

/**
 * Lookups one session of a peer nobody has vouched for may have waiting: a few sessions cannot
 * take strangers' whole share, and a new agent's first CONNECT finds room.
 */
export const MAX_STRANGER_LOOKUPS_PER_SESSION = 64;

/**
 * A FIFO of jobs that can also let go of one in the middle (a Set keeps insertion order, and
 * deletes in constant time): an abandoned or expired job leaves at once, so a flood of reset
 * CONNECTs cannot pile up entries, and the sessions they point at, behind busy connections.
 */
class JobFifo {
  readonly #jobs = new Set<Job>();

  push(job: Job): void {
    this.#jobs.add(job);
  }

  shift(): Job | undefined {
    for (const job of this.#jobs) {
      this.#jobs.delete(job);
      return job;
    }
    return undefined;
  }

  /** True when the job was here. */
  remove(job: Job): boolean {
    return this.#jobs.delete(job);
  }

  get empty(): boolean {
    return this.#jobs.size === 0;
  }

  /** Oldest first; the caller may remove the job it is given. */
  waiting(): IterableIterator<Job> {
    return this.#jobs.values();
  }
}

/**
 * Strangers' jobs: a FIFO per session, the sessions served in turn, so a newcomer's lookup waits
 * behind one of each flooding session's, not behind all of them.
 */
class TurnFifo {
  /** In turn order (a Map keeps insertion order): a served session goes to the back. */
  readonly #bySession = new Map<LookupAsker | undefined, JobFifo>();

  push(job: Job): void {
    let fifo = this.#bySession.get(job.asker);
    if (!fifo) {
      fifo = new JobFifo();
      this.#bySession.set(job.asker, fifo);
    }
    fifo.push(job);
  }

  shift(): Job | undefined {
    for (const [asker, fifo] of this.#bySession) {
      const job = fifo.shift();
      this.#bySession.delete(asker);
      if (!fifo.empty) this.#bySession.set(asker, fifo);
      if (job) return job;
    }
    return undefined;
  }

  /** Lets go of a job (abandoned, expired, moved up), and of its session once it has none. */
  remove(job: Job): void {
    const fifo = this.#bySession.get(job.asker);
    if (!fifo?.remove(job)) return;
    if (fifo.empty) this.#bySession.delete(job.asker);
  }

  /** Sessions with jobs waiting (tests). */
  get sessions(): number {
    return this.#bySession.size;
  }

  /** Each session's jobs, oldest first. */
  fifos(): IterableIterator<JobFifo> {
    return this.#bySession.values();
  }
}

/**
 * Registry work in proportion to what clients spend (DESIGN §9a):
 * - identical lookups in flight (same identity, key and destination) share one query;
 * - a lookup is given a pooled connection as soon as one is free (when asked, or when a lookup
 *   ends), and is sent after the current burst of frames has been read (setImmediate), so a stream
 *   reset in the same packet as its HEADERS never reaches PostgreSQL, and a lookup whose CONNECTs
 *   are all gone before it is sent is dropped and its connection given to the next;
 * - waiting, i.e. having no connection yet, is bounded in count (`maxQueued`: 503 at once when
 *   full; lookups given a connection or running do not count) and in time (`maxWaitMs`);
 * - peers the registry has not vouched for (no CONNECT of that identity and key allowed yet) get
 *   at most half of the queue, at most MAX_STRANGER_LOOKUPS_PER_SESSION of it per session, served
 *   one session at a time in turn, and leave a quarter of the connections free: a stranger
 *   minting CONNECTs to distinct destinations (each its own query) filled the whole queue in a
 *   review, and granted agents' uncached CONNECTs got 503. Vouched-for lookups start first.
 * A job sits in one of the two queues exactly while it is `waiting` with someone waiting on it:
 * being given a connection, abandoning, expiring and moving up each take it out. Every bound on
 * waiting (the queue, strangers' half, a session's 64) counts only `waiting` jobs: a burst of
 * CONNECTs read in one go is not refused for lookups that have a connection to start on (review
 * regression: with a pool of 2 and a queue of 2, 2 of 10 were let in, none of them waiting).
 * Denials are shared only while in flight; nothing is remembered after a lookup settles.
 */
export class LookupQueue {
  readonly #lookup: LookupFn;
  readonly #lookupMany: LookupManyFn;
  #batches = 0;
  readonly #options: LookupQueueOptions;
  readonly #inFlight = new Map<string, Job>();
  readonly #vouched = new JobFifo();
  readonly #strangers = new TurnFifo();
  /** Jobs given a connection, to be sent once the current read is over. */
  readonly #starting = new Set<Job>();
  /** Connections held: `starting` and `running` jobs. */
  #running = 0;
  /** Of those, strangers' (jobs not vouched for). */
  #runningStrangers = 0;
  /** `waiting` jobs (with a waiter: abandoned ones leave at once). */
  #waiting = 0;
  /** Of those, the ones no vouched-for peer waits on. */
  #waitingStrangers = 0;
  #expiryTimer: NodeJS.Timeout | undefined;
  #sendScheduled = false;
  /** Queries actually sent (tests, metrics). */
  #started = 0;

  /** `lookupMany`: without it a batch runs its lookups one after another on its one connection. */
  constructor(lookup: LookupFn, options: LookupQueueOptions, lookupMany?: LookupManyFn) {
    this.#lookup = lookup;
    this.#options = options;
    this.#lookupMany =
      lookupMany ??
      (async (requests) => {
        const results: AuthorizationResult[] = [];
        for (const request of requests) results.push(await lookup(request));
        return results;
      });
  }

  /** Lookups waiting for a connection that someone still waits for. */
  get queued(): number {
    return this.#waiting;
  }

  /** Lookups holding a connection: running, or about to be sent once the current read is over. */
  get running(): number {
    return this.#running;
  }

  /** Of `queued`, the lookups only peers nobody has vouched for wait on. */
  get queuedForStrangers(): number {
    return this.#waitingStrangers;
  }

  /** Sessions with strangers' lookups in the queue (tests: abandoned ones leave at once). */
  get strangerSessionsQueued(): number {
    return this.#strangers.sessions;
  }

  /** At most this many lookups for strangers wait: half the queue. */
  get #maxQueuedStrangers(): number {
    return Math.max(1, Math.floor(this.#options.maxQueued / 2));
  }

  /**
   * At most this many lookups for strangers run: a quarter of the connections (at least one) stays
   * free for vouched-for ones. With a pool of one, strangers may use it: a newcomer could never be
   * vouched for otherwise.
   */
  get #maxRunningStrangers(): number {
    const concurrency = this.#options.concurrency;
    return concurrency < 2 ? concurrency : concurrency - Math.max(1, Math.floor(concurrency / 4));
  }

  get started(): number {
    return this.#started;
  }

  /**
   * The decision for `request`, shared with identical lookups in flight asked at the same change-
   * feed `generation`. `asker`: the CONNECT's session (none for a re-check of an open tunnel,
   * which counts as vouched for). Rejects with LookupCancelledError when `signal` fires first,
   * RegistryUnavailableError when the queue (or strangers' share of it) is full, the wait too
   * long or the registry cannot be asked. `recheck`: a re-check of open tunnels (DESIGN §9b), never
   * refused for a full queue: there is at most one per key with open tunnels, and one refused
   * would leave a revoked tunnel open until its retry, past the 1 s bound (a pass over 40 keys
   * with lookup_queue_size 5 took 10 s).
   */
  authorize(request: AuthorizationRequest, signal: AbortSignal, generation = 0, asker?: LookupAsker, recheck = false): Promise<AuthorizationResult> {
    /** The asking session, when the registry has not vouched for its peer. */
    const stranger = asker?.vouched === false ? asker : undefined;
    if (signal.aborted) return Promise.reject(new LookupCancelledError());
    // The generation keeps a lookup asked after a registry change from joining one asked before it.
    const key = `${generation}\n${decisionKey(request)}`;
    let job = this.#inFlight.get(key);
    if (!job) {
      // A lookup that gets a connection at once never waits, so no bound on waiting refuses it
      // (review regression: with lookup_queue_size 1, one stranger waiting got a vouched-for
      // CONNECT a 503 beside the free connection kept for vouched-for lookups).
      const startsNow = this.#running < this.#options.concurrency && (!stranger || this.#runningStrangers < this.#maxRunningStrangers);
      if (!startsNow && !recheck && this.queued >= this.#options.maxQueued) {
        return Promise.reject(new RegistryUnavailableError(`registry lookup queue is full (${this.#options.maxQueued} waiting)`));
      }
      if (!startsNow && stranger && this.#waitingStrangers >= this.#maxQueuedStrangers) {
        return Promise.reject(new RegistryUnavailableError(`registry lookup queue is full for peers not yet vouched for (${this.#maxQueuedStrangers} waiting)`));
      }
      if (!startsNow && stranger && stranger.strangerLookupsWaiting >= MAX_STRANGER_LOOKUPS_PER_SESSION) {
        return Promise.reject(new RegistryUnavailableError(`this session, not yet vouched for, has ${MAX_STRANGER_LOOKUPS_PER_SESSION} registry lookups waiting`));
      }
      job = { key, request, enqueuedAt: performance.now(), waiters: new Set(), state: 'waiting', vouched: !stranger, asker: stranger };
      this.#inFlight.set(key, job);
      this.#waiting++;
      if (stranger) {
        this.#strangers.push(job);
        this.#waitingStrangers++;
        stranger.strangerLookupsWaiting++;
      } else this.#vouched.push(job);
      this.#assign();
      if (job.state === 'waiting') this.#armExpiry();
    } else if (!stranger && !job.vouched && job.state === 'waiting') {
      // A vouched-for peer asks the same question: the job moves up.
      this.#uncountStranger(job);
      this.#strangers.remove(job);
      job.vouched = true;
      this.#vouched.push(job);
      this.#assign();
    }
    return this.#wait(job, signal) as Promise<AuthorizationResult>;
  }

  /**
   * The decisions for many re-checks of open tunnels (DESIGN §9b) as one job: one connection and
   * one query, however many keys, so a pass over thousands of keys is a few queries. Vouched for
   * and never refused for a full queue (like `authorize(..., recheck)`), but bounded in wait like
   * any job: RegistryUnavailableError when it waits past maxWaitMs or the registry cannot answer.
   * Not shared with identical lookups in flight: a batch is asked once per pass.
   */
  authorizeMany(requests: readonly AuthorizationRequest[]): Promise<AuthorizationResult[]> {
    if (requests.length === 0) return Promise.resolve([]);
    const job: Job = { key: `batch\n${++this.#batches}`, request: requests[0]!, batch: requests, enqueuedAt: performance.now(), waiters: new Set(), state: 'waiting', vouched: true, asker: undefined };
    this.#waiting++;
    this.#vouched.push(job);
    this.#assign();
    if (job.state === 'waiting') this.#armExpiry();
    return this.#wait(job, NEVER_ABORTED) as Promise<AuthorizationResult[]>;
  }

  /** Waits for `job`'s answer; when `signal` fires first, and nobody else waits, the job is let go. */
  #wait(owner: Job, signal: AbortSignal): Promise<JobResult> {
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        signal,
        onAbort: () => {
          owner.waiters.delete(waiter);
          reject(new LookupCancelledError());
          // Nobody left to answer: a job not yet sent never will be.
          if (owner.waiters.size > 0) return;
          if (owner.state === 'waiting') {
            this.#inFlight.delete(owner.key);
            this.#leaveQueue(owner);
            owner.state = 'done';
          } else if (owner.state === 'starting') {
            // Its connection goes to the next job waiting.
            this.#inFlight.delete(owner.key);
            this.#starting.delete(owner);
            this.#release(owner);
            owner.state = 'done';
            this.#assign();
          }
        },
      };
      owner.waiters.add(waiter);
      signal.addEventListener('abort', waiter.onAbort, { once: true });
    });
  }

  /**
   * Gives free connections to waiting jobs (vouched-for first, expired ones failed instead), at
   * once, so only jobs that found none count as waiting; they are sent after the current read.
   */
  #assign(): void {
    let now: number | undefined;
    while (this.#running < this.#options.concurrency) {
      const job = this.#next();
      if (!job) break;
      this.#uncount(job);
      now ??= performance.now();
      if (now - job.enqueuedAt > this.#options.maxWaitMs) {
        this.#expire(job);
        continue;
      }
      job.state = 'starting';
      this.#running++;
      if (!job.vouched) this.#runningStrangers++;
      this.#starting.add(job);
    }
    if (this.#starting.size > 0) this.#scheduleSend();
  }

  #scheduleSend(): void {
    if (this.#sendScheduled) return;
    this.#sendScheduled = true;
    setImmediate(() => {
      this.#sendScheduled = false;
      this.#send();
    });
  }

  /** Sends the jobs given a connection whose CONNECTs are still there (the others left already). */
  #send(): void {
    for (const job of this.#starting) {
      this.#starting.delete(job);
      job.state = 'running';
      this.#started++;
      (job.batch ? this.#lookupMany(job.batch) : this.#lookup(job.request)).then(
        (result) => this.#settle(job, result, undefined),
        (error: unknown) => this.#settle(job, undefined, error),
      ).finally(() => {
        this.#release(job);
        this.#assign();
      });
    }
  }

  /** A job gives its connection back. */
  #release(job: Job): void {
    this.#running--;
    if (!job.vouched) this.#runningStrangers--;
  }

  /** The next job to start: vouched-for first; a stranger's only while their share of connections allows. */
  #next(): Job | undefined {
    return this.#vouched.shift() ?? (this.#runningStrangers < this.#maxRunningStrangers ? this.#strangers.shift() : undefined);
  }

  /** A job taken out of its queue stops counting as waiting. */
  #uncount(job: Job): void {
    this.#waiting--;
    if (!job.vouched) this.#uncountStranger(job);
  }

  /** A stranger's job stops counting against strangers' share and its session's. */
  #uncountStranger(job: Job): void {
    this.#waitingStrangers--;
    job.asker!.strangerLookupsWaiting--;
  }

  /** Takes a waiting job that will never start out of its queue and the counts. */
  #leaveQueue(job: Job): void {
    this.#uncount(job);
    if (job.vouched) this.#vouched.remove(job);
    else this.#strangers.remove(job);
  }

  /** Fails a job that waited too long (the caller took it out of its queue and the counts). */
  #expire(job: Job): void {
    job.state = 'done';
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
      for (const fifo of [this.#vouched, ...this.#strangers.fifos()]) {
        for (const job of fifo.waiting()) {
          // FIFO: the rest are younger (a job moved up keeps its age, so it may stop this early).
          if (now - job.enqueuedAt <= this.#options.maxWaitMs) break;
          this.#leaveQueue(job);
          this.#expire(job);
        }
      }
      if (this.#waiting > 0) this.#armExpiry();
    }, this.#options.maxWaitMs);
  }

  #settle(job: Job, result: JobResult | undefined, error: unknown): void {
    if (this.#inFlight.get(job.key) === job) this.#inFlight.delete(job.key);
    for (const waiter of job.waiters) {
      waiter.signal.removeEventListener('abort', waiter.onAbort);
      if (result) waiter.resolve(result);
      else waiter.reject(error);
    }
    job.waiters.clear();
  }
}
