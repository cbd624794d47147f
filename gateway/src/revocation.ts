import type { Logger } from 'pino';
import type { DenialReason } from '../../registry/authorize.js';
import { RegistryUnavailableError } from '../../registry/errors.js';
import type { Authoriser, Decision } from './authoriser.js';
import type { ChangeFeed } from './change-feed.js';
import type { GatewayMetrics } from './metrics.js';
import type { TunnelCloseDetail } from './tunnel.js';
import { keyOf, type OpenTunnel, type TunnelTracker } from './tunnels.js';

/** setTimeout's longest delay; a longer validity is re-checked when it fires, then re-armed. */
const MAX_TIMER_MS = 2 ** 31 - 1;

const NEVER_ABORTED = new AbortController().signal;

/**
 * Keys re-checked by one registry query. A query per key cost 0.3 ms of a loaded 2-core machine
 * (3,000 keys took 0.92 s to close, 5,000 took 2.3 s as the last lookups waited past
 * pool_acquire_timeout_ms and were retried); batches keep a pass over 10,000 keys to a few dozen
 * queries, each far inside query_timeout_ms, spread over the pool.
 */
const RECHECK_BATCH_KEYS = 200;

/** How a denial of an open tunnel is recorded (DESIGN §9b `detail`). */
export function closeDetailFor(reason: DenialReason): TunnelCloseDetail {
  return reason === 'permission_expired' || reason === 'principal_key_expired' || reason === 'delegation_expired' ? 'expired' : 'revoked';
}

/**
 * Live revocation (DESIGN §9b). After every registry change the feed reports, each distinct
 * (identity, SPKI, destination) with open tunnels is re-authorised once, however many tunnels
 * share it (RECHECK_BATCH_KEYS keys to a registry query), and its tunnels are closed when it is
 * no longer allowed. One timer per key fires at
 * the earliest not_after of its row, key and delegation and re-checks it then. A tunnel whose
 * decision was read before a change it might not reflect is re-checked as soon as it opens.
 * A re-check the registry cannot answer leaves the tunnels open and is retried.
 */
export class PolicyEnforcer {
  readonly #tunnels: TunnelTracker;
  readonly #authoriser: Authoriser;
  readonly #feed: ChangeFeed;
  readonly #log: Logger;
  readonly #metrics: GatewayMetrics | undefined;
  readonly #retryMs: number;
  readonly #expiry = new Map<string, { timer: NodeJS.Timeout; at: number }>();
  readonly #pending = new Set<string>();
  readonly #retry = new Set<string>();
  #running: Promise<void> | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #closed = false;
  /** Re-check passes run and keys re-checked (tests, metrics). */
  passes = 0;
  rechecks = 0;

  constructor(options: { tunnels: TunnelTracker; authoriser: Authoriser; feed: ChangeFeed; log: Logger; metrics: GatewayMetrics | undefined; retryMs: number }) {
    this.#tunnels = options.tunnels;
    this.#authoriser = options.authoriser;
    this.#feed = options.feed;
    this.#log = options.log;
    this.#metrics = options.metrics;
    this.#retryMs = options.retryMs;
    this.#feed.on('change', () => this.recheckAll());
  }

  /** Every key with open tunnels is re-checked (a registry change). */
  recheckAll(): void {
    for (const key of this.#tunnels.byAuthorisationKey().keys()) this.#pending.add(key);
    this.#kick();
  }

  /** A tunnel opened on `decision`: arm its key's expiry, and re-check it if a change may have overtaken it. */
  tunnelOpened(open: OpenTunnel, decision: Decision): void {
    const key = keyOf(open);
    if (decision.result.allowed) this.#armExpiry(key, decision.expiresAt);
    if (decision.generation !== this.#feed.generation) {
      this.#pending.add(key);
      this.#kick();
    }
  }

  /** A tunnel closed: its key's timer goes with its last tunnel. */
  tunnelClosed(open: OpenTunnel): void {
    const key = keyOf(open);
    if (this.#tunnels.byAuthorisationKey().has(key)) return;
    const expiry = this.#expiry.get(key);
    if (expiry) clearTimeout(expiry.timer);
    this.#expiry.delete(key);
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    for (const { timer } of this.#expiry.values()) clearTimeout(timer);
    this.#expiry.clear();
    this.#pending.clear();
  }

  /** `at`: performance.now() when the key's row, key or delegation expires. */
  #armExpiry(key: string, at: number): void {
    const current = this.#expiry.get(key);
    if (current && current.at <= at) return;
    if (current) clearTimeout(current.timer);
    const timer = setTimeout(() => {
      this.#expiry.delete(key);
      this.#pending.add(key);
      this.#kick();
    }, Math.min(Math.max(0, at - performance.now()), MAX_TIMER_MS));
    timer.unref();
    this.#expiry.set(key, { timer, at });
  }

  #kick(): void {
    if (this.#closed || this.#running) return;
    this.#running = this.#drain().finally(() => {
      this.#running = undefined;
      // Keys added while the last pass was finishing.
      if (this.#pending.size > 0) this.#kick();
    });
  }

  async #drain(): Promise<void> {
    while (this.#pending.size > 0 && !this.#closed) {
      const keys = [...this.#pending];
      this.#pending.clear();
      this.passes++;
      const started = performance.now();
      const failed: string[] = [];
      let closed = 0;
      let unavailable: string | undefined;
      const asked: { key: string; sample: OpenTunnel }[] = [];
      for (const key of keys) {
        const sample = this.#tunnels.byAuthorisationKey().get(key)?.any();
        if (sample) asked.push({ key, sample });
      }
      this.rechecks += asked.length;
      const batches: (typeof asked)[] = [];
      for (let i = 0; i < asked.length; i += RECHECK_BATCH_KEYS) batches.push(asked.slice(i, i + RECHECK_BATCH_KEYS));
      await Promise.all(
        batches.map(async (batch) => {
          const requests = batch.map(({ sample }) => ({ identity: sample.identity, spkiDer: sample.spkiDer, destination: sample.destination }));
          let decisions: Decision[];
          try {
            // One key alone (a tunnel overtaken by a change, an expiry) keeps the CONNECTs' path:
            // it may share a CONNECT's lookup in flight, or be read from the standby.
            decisions = batch.length === 1 ? [await this.#authoriser.lookUp(requests[0]!, NEVER_ABORTED, undefined, true)] : await this.#authoriser.lookUpMany(requests);
          } catch (error) {
            if (!(error instanceof RegistryUnavailableError)) this.#log.error({ event: 'recheck_failed', err: (error as Error).stack }, 'unexpected error re-checking open tunnels');
            else unavailable = error.message;
            for (const { key } of batch) failed.push(key);
            return;
          }
          batch.forEach(({ key, sample }, i) => {
            closed += this.#enforce(key, sample, decisions[i]!);
          });
        }),
      );
      this.#log.debug({ event: 'recheck_pass', keys: keys.length, batches: batches.length, closed, failed: failed.length, ms: Math.round(performance.now() - started) }, 'open tunnels re-checked');
      if (failed.length > 0) {
        // Once per pass, not per batch: an outage would otherwise log dozens of lines a second.
        if (unavailable !== undefined) this.#log.warn({ event: 'recheck_unavailable', keys: failed.length, err: unavailable, retry_in_ms: this.#retryMs }, 'the registry could not re-check open tunnels: they stay open and are asked again');
        this.#retryLater(failed);
      }
    }
  }

  /** Applies a re-check's decision to the key's open tunnels; returns how many it closed. */
  #enforce(key: string, sample: OpenTunnel, decision: Decision): number {
    const result = decision.result;
    if (result.allowed) {
      this.#armExpiry(key, decision.expiresAt);
      return 0;
    }
    const detail = closeDetailFor(result.reason);
    let closed = 0;
    for (const open of this.#tunnels.byAuthorisationKey().get(key) ?? []) {
      if (!open.tunnel.close(detail)) continue;
      this.#metrics?.policyClose(detail);
      closed++;
    }
    this.#log.info({ event: 'tunnels_revoked', identity: sample.identity, spki_fingerprint: sample.spkiFingerprint, destination: sample.destination, reason: result.reason, detail, tunnels: closed }, 'open tunnels no longer authorised: closed');
    return closed;
  }

  /** The registry could not answer: the tunnels stay, and the keys are asked again. */
  #retryLater(keys: string[]): void {
    for (const key of keys) this.#retry.add(key);
    if (this.#retryTimer) return;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      for (const key of this.#retry) this.#pending.add(key);
      this.#retry.clear();
      this.#kick();
    }, this.#retryMs);
    this.#retryTimer.unref();
  }
}

