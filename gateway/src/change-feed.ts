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

const BACKOFF_INITIAL_MS = 100;
const BACKOFF_MAX_MS = 5000;
/** Announced counters kept for the next poll; past it they are forgotten and the poll re-checks. */
const MAX_ANNOUNCED = 10_000;

/**
 * The registry change feed (DESIGN §9b): LISTEN agent_gateway_registry on a dedicated connection
 * (reconnected with back-off) for changes as they commit, and the change counter polled every
 * `pollIntervalMs`, so a notification lost while that connection was down is still seen.
 *
 * `generation` advances on every change the gateway learns of; a decision read at an older
 * generation may predate the change and is never trusted as fresh. `confirmed` is false when
 * neither the LISTEN connection is up nor a poll has succeeded recently: then nothing cached may
 * be used (fail closed). Emits 'change' (coalesced) and 'state'.
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
  #lostSignalled = false;
  /** The highest change counter learnt from a poll or a notification's payload; undefined while unknown. */
  #known: bigint | undefined;
  /** Bumped when a change arrives whose counter is unknown: only a poll started later may re-learn it. */
  #epoch = 0;
  /**
   * Counters whose notification has been acted on, until a poll reads past them: a change both
   * paths report is re-checked once, not twice. Only a payload that arrived on the LISTEN
   * connection still up counts; a forged one saves at most a redundant re-check (see #poll).
   */
  readonly #announced = new Set<bigint>();
  /** The counter of the last poll that reported a change (or of the first poll): notifications at or below it are re-checked already. */
  #pollCovered: bigint | undefined;

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

  #poll(): Promise<void> {
    this.#polling ??= (async () => {
      const epoch = this.#epoch;
      try {
        const counter = await this.#options.readCounter();
        if (epoch === this.#epoch) this.#learn(BigInt(counter));
        const wasConfirmed = this.confirmed;
        this.#lastPollOk = performance.now();
        this.#lostSignalled = false;
        if (this.#counter === undefined) this.#pollCovered = BigInt(counter);
        else if (counter !== this.#counter && !this.#allAnnounced(BigInt(this.#counter), BigInt(counter))) {
          this.#changed('poll');
          this.#pollCovered = BigInt(counter);
        }
        this.#counter = counter;
        for (const seen of this.#announced) if (seen <= BigInt(counter)) this.#announced.delete(seen);
        if (!wasConfirmed) this.emit('state');
      } catch (error) {
        this.#options.log.debug({ event: 'change_feed_poll_failed', err: (error as Error).message }, 'registry change counter unreadable');
        if (!this.confirmed) this.#lost();
      }
    })().finally(() => {
      this.#polling = undefined;
    });
    return this.#polling;
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
      const counter = payloadCounter(message.payload);
      if (counter === undefined) this.#forget();
      else {
        this.#learn(counter);
        // A poll that reported a change at this counter or a later one has re-checked for it
        // already (a poll can read the counter between the commit and its notification): a second
        // pass would ask the registry once more for every open key. Only a poll that reported
        // covers: one that stayed quiet because notifications had announced the counters (perhaps
        // forged ahead of the real change) does not, so the real notification still re-checks.
        // After a restore that lowers the counter, the next poll (which sees it go back) reports.
        if (this.#pollCovered !== undefined && counter <= this.#pollCovered) return;
        if (this.#announced.size >= MAX_ANNOUNCED) this.#announced.clear();
        this.#announced.add(counter);
      }
      this.#changed('notify');
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

  #learn(counter: bigint): void {
    if (this.#known === undefined || counter > this.#known) this.#known = counter;
  }

  /**
   * Every change from `from` (exclusive) to `to` came with a notification already acted on, so
   * the poll that read `to` has nothing new to re-check. A notification that never arrives is
   * not announced, and the poll catches its change; one forged ahead of the real change (anyone
   * may NOTIFY) is cleared with the connection it came on, or else the real one follows it.
   */
  #allAnnounced(from: bigint, to: bigint): boolean {
    if (to <= from || to - from > BigInt(this.#announced.size)) return false;
    for (let counter = from + 1n; counter <= to; counter++) if (!this.#announced.has(counter)) return false;
    return true;
  }

  #forget(): void {
    this.#announced.clear();
    this.#known = undefined;
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
