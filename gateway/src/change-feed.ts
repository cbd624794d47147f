import { EventEmitter } from 'node:events';
import pg from 'pg';
import type { Logger } from 'pino';
import { CHANGE_CHANNEL } from '../../registry/queries.js';

export interface ChangeFeedOptions {
  readonly databaseUrl: string;
  /** How often the change counter is read, whatever the LISTEN connection says. */
  readonly pollIntervalMs: number;
  readonly connectTimeoutMs: number;
  /** Reads the counter (through the registry pool, bounded by its timeouts). */
  readonly readCounter: () => Promise<string>;
  readonly log: Logger;
}

interface AnswerWaiter {
  readonly upTo: number;
  readonly resolve: () => void;
}

const BACKOFF_INITIAL_MS = 100;
const BACKOFF_MAX_MS = 5000;
/**
 * How long a notification waits for the counter read that answers it before decisions read until
 * then stop counting as fresh anyway: well inside DESIGN §9b's 100 ms, so a read held up by a busy
 * pool still keeps a revocation within it, while notifications the reads find no change behind
 * (duplicates, or a flood of forged ones: anyone who can connect may NOTIFY) leave the cache warm.
 */
export const NOTIFY_CONFIRM_MS = 40;
/** Reads asked by notifications start at most this often: a flood costs one read per gap. */
const NOTIFY_READ_GAP_MS = 10;

/**
 * The registry change feed (DESIGN §9b): LISTEN agent_gateway_registry on a dedicated connection
 * (reconnected with back-off) for changes as they commit, and the change counter polled every
 * `pollIntervalMs`, so a notification lost while that connection was down is still seen.
 *
 * A notification is only a cue to read the counter at once: anyone who can connect may NOTIFY
 * (PostgreSQL has no privilege for it) with any payload, so neither its arrival nor its payload is
 * taken as proof that a change committed or was re-checked. A change is reported ('change') when a
 * read of the counter finds it moved, whichever path asked for the read: the read starts after the
 * notification arrived, so it sees that notification's commit, and the re-check it starts comes
 * after that commit. One read answers every notification heard before it started.
 *
 * `generation` advances on every change the gateway learns of, and when a notification's read has
 * not answered within NOTIFY_CONFIRM_MS; a decision read at an older generation may predate the
 * change and is never trusted as fresh. `confirmed` is
 * false when neither the LISTEN connection is up nor a poll has succeeded recently: then nothing
 * cached may be used (fail closed). Emits 'change' (coalesced) and 'state'.
 */
export class ChangeFeed extends EventEmitter {
  readonly #options: ChangeFeedOptions;
  #generation = 0;
  #counter: string | undefined;
  #listener: pg.Client | undefined;
  #listening = false;
  #lastPollOk = -Infinity;
  /** When the LISTEN connection last answered a query (its heartbeat). */
  #lastListenOk = -Infinity;
  /** The LISTEN connection whose heartbeat is unanswered, and since when. */
  #heartbeat: { client: pg.Client; since: number; down: (why: string) => void } | undefined;
  #listenerDown: ((why: string) => void) | undefined;
  #pollTimer: NodeJS.Timeout | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #attempt = 0;
  #closed = false;
  #changeScheduled = false;
  #polling: Promise<void> | undefined;
  /** A notification arrived while a read was in flight (it may predate that commit): read again after it. */
  #notifiedDuringPoll = false;
  /** When the oldest notification no read has answered yet arrived (a read answers those heard before it started). */
  #unansweredSince: number | undefined;
  /** When the first notification since the current read started arrived: the read does not answer it. */
  #heardSinceReadStart: number | undefined;
  /** Advances the generation when #unansweredSince is NOTIFY_CONFIRM_MS old. */
  #confirmTimer: NodeJS.Timeout | undefined;
  /** Notifications heard, and how many of the first ones are answered (by a read started after them, or by the deadline). */
  #heardCount = 0;
  #answeredCount = 0;
  /** Waiting for #answeredCount to reach `upTo` (notificationsAnswered). */
  #answerWaiters: AnswerWaiter[] = [];
  /** A read for notifications waiting out NOTIFY_READ_GAP_MS. */
  #nextRead: NodeJS.Timeout | undefined;
  #lastReadStartedAt = -Infinity;
  #lostSignalled = false;
  /**
   * The newest change counter known, for standby freshness only: the last read's, raised at once
   * by any notification's payload while known (a forged one sends reads to the primary until the
   * next read lowers it back; never the other way). Undefined while unknown; only a read sets it.
   */
  #known: bigint | undefined;
  /** Bumped when a change arrives whose counter is unknown: only a poll started later may re-learn it. */
  #epoch = 0;
  /** The highest payload counter heard since the last read started (undefined: none). */
  #heard: bigint | undefined;
  /** A payload above the counter was logged at warn once; later ones at debug. */
  #aheadWarned = false;

  constructor(options: ChangeFeedOptions) {
    super();
    this.#options = options;
  }

  get generation(): number {
    return this.#generation;
  }

  get listening(): boolean {
    return this.#listening;
  }

  /** 0 while LISTEN is up and answering; else seconds since the last successful poll (Infinity before any). */
  get lagSeconds(): number {
    const now = performance.now();
    return this.#listening && now - this.#lastListenOk <= this.#staleAfterMs() ? 0 : (now - this.#lastPollOk) / 1000;
  }

  /**
   * The newest change counter this feed has seen, while it is confirmed: a read from a standby
   * is as fresh as the feed only if it saw at least this counter (DESIGN §9g). Undefined when the
   * feed is unconfirmed or a change's counter is not known yet: then only the primary will do.
   */
  get knownCounter(): bigint | undefined {
    return this.confirmed ? this.#known : undefined;
  }

  /**
   * Some path would tell us of a change now: the LISTEN connection, or a recent poll. The LISTEN
   * connection counts only while it answers its heartbeat: across a partition that sends no FIN
   * or RST it stays "up" for as long as TCP keepalive takes (hours), hearing nothing.
   */
  get confirmed(): boolean {
    if (this.#closed) return false;
    const now = performance.now();
    const stale = this.#staleAfterMs();
    return (this.#listening && now - this.#lastListenOk <= stale) || now - this.#lastPollOk <= stale;
  }

  async start(): Promise<void> {
    await this.#poll();
    this.#pollTimer = setInterval(() => this.#tick(), this.#options.pollIntervalMs);
    this.#pollTimer.unref();
    this.#connect();
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#pollTimer);
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#confirmTimer);
    clearTimeout(this.#nextRead);
    this.#answered(Infinity);
    const listener = this.#listener;
    this.#listener = undefined;
    this.#listening = false;
    await listener?.end().catch(() => {});
  }

  /** A poll that fails twice in a row, or is overdue by a whole interval, no longer confirms. */
  #staleAfterMs(): number {
    return 2 * this.#options.pollIntervalMs + 500;
  }

  #tick(): void {
    void this.#poll();
    this.#beat();
    // Neither path has answered lately, though none has failed outright (a silent partition).
    if (!this.confirmed) this.#lost();
  }

  /** A query on the LISTEN connection: an answer shows that notifications can still arrive on it. */
  #beat(): void {
    const client = this.#listener;
    if (!client || !this.#listening) return;
    const pending = this.#heartbeat;
    if (pending?.client === client) {
      // Unanswered past the stale bound: drop the connection, and listen again on a new one.
      if (performance.now() - pending.since > this.#staleAfterMs()) pending.down('heartbeat unanswered');
      return;
    }
    const down = this.#listenerDown!;
    this.#heartbeat = { client, since: performance.now(), down };
    client.query('SELECT 1').then(
      () => {
        if (this.#heartbeat?.client === client) this.#heartbeat = undefined;
        if (this.#listener === client) this.#lastListenOk = performance.now();
      },
      // The connection's 'error' listener reports it down.
      () => {},
    );
  }

  /**
   * Reads the counter and reports a change when it moved since the last read. `notified`: asked by
   * a notification, which the report (or, if the counter cannot be read, a re-check regardless)
   * answers. A read already in flight may have started before the notification's commit: another
   * read follows it.
   */
  #poll(notified = false): Promise<void> {
    // A read asked by notifications never joins one in flight (#readForNotification).
    if (this.#polling) return this.#polling;
    this.#lastReadStartedAt = performance.now();
    this.#heardSinceReadStart = undefined;
    const covers = this.#heardCount;
    this.#polling = (async () => {
      const epoch = this.#epoch;
      // Payloads heard before this read started: a true one is at or below what it returns.
      const heardBefore = this.#heard;
      this.#heard = undefined;
      try {
        const read = await this.#options.readCounter();
        const counter = BigInt(read);
        if (heardBefore !== undefined && heardBefore > counter) this.#ahead(heardBefore, counter);
        // Payloads heard while reading may be true changes newer than the read: keep the higher.
        if (epoch === this.#epoch) this.#known = this.#heard !== undefined && this.#heard > counter ? this.#heard : counter;
        const wasConfirmed = this.confirmed;
        this.#lastPollOk = performance.now();
        this.#lostSignalled = false;
        // The one place a change is reported: the counter read from the database moved (or, with
        // no earlier read to compare, a notification asked).
        if (this.#counter === undefined ? notified : read !== this.#counter) this.#changed(notified ? 'notify' : 'poll');
        this.#counter = read;
        // Every notification heard before this read started is answered (by a change, or by none).
        this.#unansweredSince = this.#heardSinceReadStart;
        this.#armConfirm();
        this.#answered(covers);
        if (!wasConfirmed) this.emit('state');
      } catch (error) {
        this.#options.log.debug({ event: 'change_feed_poll_failed', err: (error as Error).message }, 'registry change counter unreadable');
        // A notification that no read could confirm still re-checks (the next read that
        // succeeds reports the change again if the counter moved: a second pass, never none).
        if (notified) this.#changed('notify');
        if (!this.confirmed) this.#lost();
      }
    })().finally(() => {
      this.#polling = undefined;
      if (this.#notifiedDuringPoll && !this.#closed) {
        this.#notifiedDuringPoll = false;
        this.#readForNotification();
      }
    });
    return this.#polling;
  }

  /**
   * Settles once every notification heard so far is answered: by the counter read it asked for
   * (which, if it found a change, has advanced the generation) or, at the latest, by the
   * NOTIFY_CONFIRM_MS deadline (which advances it anyway). Undefined when none is waiting. A
   * CONNECT about to be answered waits for this before it checks that its decision is current,
   * so a change whose notification came in while it dialled still has it asked again.
   */
  notificationsAnswered(): Promise<void> | undefined {
    if (this.#answeredCount >= this.#heardCount || this.#closed) return undefined;
    const upTo = this.#heardCount;
    return new Promise((resolve) => this.#answerWaiters.push({ upTo, resolve }));
  }

  #answered(upTo: number): void {
    if (upTo <= this.#answeredCount) return;
    this.#answeredCount = Math.min(upTo, this.#heardCount);
    if (this.#answerWaiters.length === 0) return;
    const waiting: AnswerWaiter[] = [];
    for (const waiter of this.#answerWaiters) {
      if (waiter.upTo <= this.#answeredCount || this.#closed) waiter.resolve();
      else waiting.push(waiter);
    }
    this.#answerWaiters = waiting;
  }

  /** (Re)arms the deadline of the oldest unanswered notification, if any. */
  #armConfirm(): void {
    clearTimeout(this.#confirmTimer);
    this.#confirmTimer = undefined;
    const since = this.#unansweredSince;
    if (since === undefined || this.#closed) return;
    this.#confirmTimer = setTimeout(() => {
      this.#confirmTimer = undefined;
      // Late: whatever was read before now no longer counts as fresh, which is all a notification
      // asks of the cache (decisions read after it arrived were read after its commit).
      this.#unansweredSince = undefined;
      this.#heardSinceReadStart = undefined;
      this.#generation++;
      this.#answered(this.#heardCount);
    }, Math.max(0, since + NOTIFY_CONFIRM_MS - performance.now()));
    this.#confirmTimer.unref();
  }

  /** A read answering the notifications heard so far: now, after the one in flight, or once the gap since the last read has passed. */
  #readForNotification(): void {
    if (this.#closed || this.#nextRead) return;
    if (this.#polling) {
      this.#notifiedDuringPoll = true;
      return;
    }
    const wait = this.#lastReadStartedAt + NOTIFY_READ_GAP_MS - performance.now();
    if (wait <= 0) {
      void this.#poll(true);
      return;
    }
    this.#nextRead = setTimeout(() => {
      this.#nextRead = undefined;
      this.#readForNotification();
    }, wait);
    this.#nextRead.unref();
  }

  /** A payload counter the database had not reached when read after it: forged (or from another database). */
  #ahead(payload: bigint, counter: bigint): void {
    const fields = { event: 'change_feed_payload_ahead', payload_counter: payload.toString(), counter: counter.toString() };
    const message = 'a registry notification announced a change counter the database has not reached: ignored (anyone who can connect may NOTIFY)';
    if (this.#aheadWarned) this.#options.log.debug(fields, message);
    else {
      this.#aheadWarned = true;
      this.#options.log.warn(fields, message);
    }
  }

  #connect(): void {
    if (this.#closed) return;
    const client = new pg.Client({ connectionString: this.#options.databaseUrl, connectionTimeoutMillis: this.#options.connectTimeoutMs, keepAlive: true, application_name: 'agent-gateway-feed' });
    this.#listener = client;
    let gone = false;
    const down = (why: string) => {
      if (gone) return;
      gone = true;
      if (this.#listener === client) this.#listener = undefined;
      if (this.#heartbeat?.client === client) this.#heartbeat = undefined;
      const was = this.#listening;
      this.#listening = false;
      this.#lastListenOk = -Infinity;
      // Whatever LISTEN would have told us since the last poll is unknown: the cache waits for a
      // poll to confirm the counter again (started now).
      this.#lastPollOk = -Infinity;
      this.#forget();
      if (!this.#closed) void this.#poll();
      client.end().catch(() => {});
      if (this.#closed) return;
      if (was) this.#options.log.warn({ event: 'change_feed_down', err: why }, 'registry change feed lost: polling only until it is back');
      if (!this.confirmed) this.#lost();
      this.emit('state');
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** this.#attempt++);
      this.#retryTimer = setTimeout(() => this.#connect(), delay);
      this.#retryTimer.unref();
    };
    this.#listenerDown = down;
    client.on('error', (error) => down(error.message));
    client.on('end', () => down('connection ended'));
    client.on('notification', (message) => {
      if (message.channel !== CHANGE_CHANNEL) return;
      // Decisions read before now may predate a change: unless a read answers within
      // NOTIFY_CONFIRM_MS, they stop counting as fresh then.
      const now = performance.now();
      this.#heardCount++;
      this.#heardSinceReadStart ??= now;
      if (this.#unansweredSince === undefined) {
        this.#unansweredSince = now;
        this.#armConfirm();
      }
      // The payload only raises the counter a standby must reach (fail-safe: the primary answers).
      const counter = payloadCounter(message.payload);
      if (counter === undefined) this.#forget();
      else {
        this.#learn(counter);
        if (this.#heard === undefined || counter > this.#heard) this.#heard = counter;
      }
      // Whether anything changed, and so whether to re-check, the counter read says.
      this.#readForNotification();
    });
    client
      .connect()
      .then(() => client.query(`LISTEN ${CHANGE_CHANNEL}`))
      .then(async () => {
        if (gone || this.#closed) return;
        this.#listening = true;
        this.#lastListenOk = performance.now();
        this.#lostSignalled = false;
        this.#attempt = 0;
        this.#options.log.info({ event: 'change_feed_up' }, 'listening for registry changes');
        // Changes committed while we were not listening: the counter tells.
        await this.#poll();
        this.emit('state');
      })
      .catch((error: unknown) => down((error as Error).message));
  }

  /**
   * A payload only raises a counter already known. While it is unknown (after #forget: a
   * payload-less notification, which anyone may send, or the feed lost), only a counter read may
   * set it: a forged payload learnt from nothing (`{"counter": 0}`) would let any standby, however
   * far behind, pass the freshness check until that read came back (review).
   */
  #learn(counter: bigint): void {
    if (this.#known !== undefined && counter > this.#known) this.#known = counter;
  }

  #forget(): void {
    this.#known = undefined;
    this.#heard = undefined;
    this.#epoch++;
  }

  /** Nothing can tell us of a change any more: everything learnt so far must be re-learnt. */
  #lost(): void {
    this.#forget();
    if (this.#lostSignalled) return;
    this.#lostSignalled = true;
    this.#generation++;
    this.#options.log.warn({ event: 'change_feed_lost' }, 'registry change feed unconfirmed: cached decisions are not used');
    this.emit('change', 'feed_lost');
  }

  #changed(source: 'notify' | 'poll'): void {
    this.#generation++;
    if (this.#changeScheduled) return;
    this.#changeScheduled = true;
    // Coalesced: a bulk write raising many notifications is one re-check.
    setImmediate(() => {
      this.#changeScheduled = false;
      this.emit('change', source);
    });
  }
}

/** The counter migration 0002's trigger puts in the payload, or undefined when it is not there. */
function payloadCounter(payload: string | undefined): bigint | undefined {
  try {
    const counter = (JSON.parse(payload ?? '') as { counter?: unknown }).counter;
    return typeof counter === 'number' && Number.isSafeInteger(counter) && counter >= 0 ? BigInt(counter) : undefined;
  } catch {
    return undefined;
  }
}
