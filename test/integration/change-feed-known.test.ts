/**
 * gateway/src/change-feed.ts: the counter a standby must reach (knownCounter) is never lowered by a
 * notification's payload. Anyone who can connect may NOTIFY agent_gateway_registry with any payload
 * (PostgreSQL has no privilege on NOTIFY): a payload may only raise a counter already known.
 *
 * Review regression: a payload-less NOTIFY made the feed forget its counter (#forget), and the next
 * NOTIFY's payload, {"counter": 0}, was then "learnt" from nothing: knownCounter was 0 until a
 * counter read with the same epoch came back (never, while the pair is repeated), so a standby
 * any amount behind passed the freshness check and answered lookups and re-checks.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { ChangeFeed } from '../../gateway/src/change-feed.js';
import { captureLogger } from '../helpers/logs.js';
import { createDatabase, testServer } from '../helpers/postgres.js';

let server: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;

before(async () => {
  server = await testServer();
  databaseUrl = await createDatabase(server.url, { migrate: false });
});
after(() => server.close());

async function until(condition: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = performance.now() + ms;
  while (!condition()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test('change feed: a forged payload after a payload-less NOTIFY does not lower the counter a standby must reach', async () => {
  const lines: Record<string, unknown>[] = [];
  let hold: Promise<void> | undefined;
  let release!: () => void;
  const readCounter = async (): Promise<string> => {
    if (hold) await hold;
    return '100';
  };
  const feed = new ChangeFeed({ databaseUrl, pollIntervalMs: 60_000, connectTimeoutMs: 5000, readCounter, log: captureLogger(lines) });
  const notifier = new pg.Client({ connectionString: databaseUrl });
  await notifier.connect();
  try {
    await feed.start();
    await until(() => feed.listening, 5000, 'LISTEN up');
    await until(() => feed.knownCounter === 100n, 2000, 'the counter read');
    // Counter reads now take a while (a loaded primary): the window the forger needs.
    hold = new Promise<void>((resolve) => (release = resolve));
    const generation = feed.generation;
    await notifier.query(`SELECT pg_notify('agent_gateway_registry', '')`);
    await notifier.query(`SELECT pg_notify('agent_gateway_registry', $1)`, [JSON.stringify({ counter: 0 })]);
    // Their counter read is held up: past NOTIFY_CONFIRM_MS the feed makes cached decisions stale.
    await until(() => feed.generation > generation, 2000, 'the notifications heard');
    await new Promise((resolve) => setTimeout(resolve, 50)); // the second, sent after the first, is in too
    assert.equal(feed.confirmed, true, 'LISTEN is up and answering: the feed is confirmed');
    const known = feed.knownCounter;
    assert.ok(known === undefined || known >= 100n, `knownCounter ${String(known)} after a forged {"counter":0}: a standby at 0 would be taken as fresh`);
    release();
    hold = undefined;
    await until(() => feed.knownCounter === 100n, 2000, 'the counter read after the notifications');
  } finally {
    release?.();
    hold = undefined;
    await notifier.end();
    await feed.close();
  }
});
