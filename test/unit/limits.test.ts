import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Limiter, type LimitSettings } from '../../gateway/src/limits.js';

/** A clock the test moves by hand (milliseconds). */
function manualClock(start = 1_000) {
  let now = start;
  return { now: () => now, advance: (ms: number) => void (now += ms) };
}

const settings = (overrides: Partial<LimitSettings> = {}): LimitSettings => ({ connect_rate_per_second: 0, connect_burst: 1, max_tunnels_per_identity: 0, ...overrides });

test('no limits configured: every CONNECT is admitted and nothing is tracked', () => {
  const limiter = new Limiter(settings());
  for (let i = 0; i < 10_000; i++) assert.deepEqual(limiter.admit(`k${i}`), { ok: true, slot: false });
  assert.equal(limiter.trackedBuckets, 0);
});

test('token bucket: the burst passes at once, then one CONNECT per 1/rate seconds', () => {
  const clock = manualClock();
  const limiter = new Limiter(settings({ connect_rate_per_second: 5, connect_burst: 2 }), { now: clock.now });
  assert.equal(limiter.admit('a').ok, true);
  assert.equal(limiter.admit('a').ok, true);
  assert.deepEqual(limiter.admit('a'), { ok: false, reason: 'rate_limited' });
  clock.advance(199);
  assert.equal(limiter.admit('a').ok, false, 'not quite one token after 199 ms');
  clock.advance(1);
  assert.equal(limiter.admit('a').ok, true, 'one token after 200 ms');
  assert.equal(limiter.admit('a').ok, false);
  clock.advance(10_000);
  assert.equal(limiter.admit('a').ok, true);
  assert.equal(limiter.admit('a').ok, true);
  assert.equal(limiter.admit('a').ok, false, 'an idle bucket refills to the burst, not beyond');
});

test('buckets are per key', () => {
  const clock = manualClock();
  const limiter = new Limiter(settings({ connect_rate_per_second: 1, connect_burst: 1 }), { now: clock.now });
  assert.equal(limiter.admit('agent-a\nsha256:1').ok, true);
  assert.equal(limiter.admit('agent-a\nsha256:1').ok, false);
  assert.equal(limiter.admit('agent-a\nsha256:2').ok, true, 'same identity, another key: its own bucket');
  assert.equal(limiter.admit('agent-b\nsha256:1').ok, true);
});

test('fractional rates: 0.5/s admits one CONNECT every two seconds', () => {
  const clock = manualClock();
  const limiter = new Limiter(settings({ connect_rate_per_second: 0.5, connect_burst: 1 }), { now: clock.now });
  assert.equal(limiter.admit('a').ok, true);
  clock.advance(1999);
  assert.equal(limiter.admit('a').ok, false);
  clock.advance(1);
  assert.equal(limiter.admit('a').ok, true);
});

test('a clock that goes backwards adds no tokens', () => {
  const clock = manualClock(10_000);
  const limiter = new Limiter(settings({ connect_rate_per_second: 1, connect_burst: 1 }), { now: clock.now });
  assert.equal(limiter.admit('a').ok, true);
  clock.advance(-5000);
  assert.equal(limiter.admit('a').ok, false);
});

test('concurrency: slots are held until released; a denied CONNECT holds none', () => {
  const limiter = new Limiter(settings({ max_tunnels_per_identity: 2 }));
  assert.deepEqual(limiter.admit('a'), { ok: true, slot: true });
  assert.deepEqual(limiter.admit('a'), { ok: true, slot: true });
  assert.deepEqual(limiter.admit('a'), { ok: false, reason: 'too_many_tunnels' });
  assert.equal(limiter.openSlots('a'), 2);
  assert.equal(limiter.admit('b').ok, true, 'another key has its own slots');
  limiter.release('a');
  assert.equal(limiter.openSlots('a'), 1);
  assert.equal(limiter.admit('a').ok, true);
  limiter.release('a');
  limiter.release('a');
  limiter.release('a'); // one too many: ignored, never negative
  assert.equal(limiter.openSlots('a'), 0);
  assert.equal(limiter.admit('a').ok, true);
});

test('rate is checked before concurrency, so a rate-limited CONNECT takes no slot', () => {
  const clock = manualClock();
  const limiter = new Limiter(settings({ connect_rate_per_second: 1, connect_burst: 1, max_tunnels_per_identity: 5 }), { now: clock.now });
  assert.deepEqual(limiter.admit('a'), { ok: true, slot: true });
  assert.deepEqual(limiter.admit('a'), { ok: false, reason: 'rate_limited' });
  assert.equal(limiter.openSlots('a'), 1);
});

test('update(): new settings apply at once; open slots and spent tokens are kept', () => {
  const clock = manualClock();
  const limiter = new Limiter(settings({ connect_rate_per_second: 1, connect_burst: 3, max_tunnels_per_identity: 3 }), { now: clock.now });
  for (let i = 0; i < 3; i++) assert.equal(limiter.admit('a').ok, true);
  limiter.update(settings({ connect_rate_per_second: 10, connect_burst: 1, max_tunnels_per_identity: 1 }));
  clock.advance(1000);
  assert.deepEqual(limiter.admit('a'), { ok: false, reason: 'too_many_tunnels' }, 'three slots still open, cap now 1');
  limiter.release('a');
  limiter.release('a');
  limiter.release('a');
  clock.advance(1000);
  assert.equal(limiter.admit('a').ok, true);
  assert.equal(limiter.admit('a').ok, false);
  // Switching the cap off: admitted without a slot.
  limiter.update(settings({ connect_rate_per_second: 0, connect_burst: 1, max_tunnels_per_identity: 0 }));
  assert.deepEqual(limiter.admit('a'), { ok: true, slot: false });
  assert.equal(limiter.trackedBuckets, 0, 'turning the rate off forgets the buckets');
});

test('update() with invalid settings throws and changes nothing', () => {
  const limiter = new Limiter(settings({ connect_rate_per_second: 1, connect_burst: 1 }));
  for (const bad of [{ connect_burst: 0 }, { connect_rate_per_second: -1 }, { connect_rate_per_second: Number.NaN }, { max_tunnels_per_identity: 1.5 }]) {
    assert.throws(() => limiter.update(settings({ connect_rate_per_second: 1, connect_burst: 1, ...bad })), RangeError);
  }
  assert.equal(limiter.settings.connect_rate_per_second, 1);
  assert.throws(() => new Limiter(settings({ connect_burst: 0 })), RangeError);
});

test('memory is bounded: the least recently used buckets are evicted', () => {
  const clock = manualClock();
  const limiter = new Limiter(settings({ connect_rate_per_second: 1, connect_burst: 1 }), { now: clock.now, maxTrackedIdentities: 100 });
  for (let i = 0; i < 10_000; i++) limiter.admit(`k${i}`);
  assert.equal(limiter.trackedBuckets, 100);
  assert.equal(limiter.admit('k9999').ok, false, 'recent keys are remembered');
  assert.equal(limiter.admit('k0').ok, true, 'an evicted key starts with a full bucket again');
});
