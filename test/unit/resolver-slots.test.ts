import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ResolverSlots } from '../../gateway/src/resolver-slots.js';

/** A lookup the test settles by hand. */
function pending(): { promise: Promise<string>; settle: (value: string) => void; fail: (error: Error) => void } {
  let settle!: (value: string) => void;
  let fail!: (error: Error) => void;
  const promise = new Promise<string>((resolve, reject) => ((settle = resolve), (fail = reject)));
  return { promise, settle, fail };
}

test('resolver slots: per key, a waiter starts when one of its own key settles; other keys are not held', async () => {
  const slots = new ResolverSlots(2);
  const lookups = [pending(), pending(), pending()];
  let started = 0;
  const runs = lookups.map((lookup, i) => slots.run('a', `name${i}`, () => (started++, lookup.promise), () => true));
  assert.equal(started, 2);
  assert.deepEqual([slots.running('a'), slots.waiting('a')], [2, 1]);
  assert.equal(await slots.run('b', 'name2', async () => 'b answered', () => true), 'b answered', 'another key runs at once');
  lookups[0]!.settle('first');
  assert.equal(await runs[0], 'first');
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(started, 3, 'the waiter took the freed slot');
  lookups[1]!.fail(new Error('ENOTFOUND'));
  await assert.rejects(runs[1]!, /ENOTFOUND/);
  lookups[2]!.settle('third');
  assert.equal(await runs[2], 'third');
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual([slots.running('a'), slots.waiting('a'), slots.running('b')], [0, 0, 0], 'nothing kept');
});

test('resolver slots: a waiter no longer wanted at its turn never starts, and its promise rejects', async () => {
  const slots = new ResolverSlots(1);
  const first = pending();
  void slots.run('a', 'name3', () => first.promise, () => true);
  let gone = false;
  let started = false;
  const waiter = slots.run('a', 'name4', () => ((started = true), Promise.resolve('late')), () => !gone);
  gone = true;
  first.settle('done');
  await assert.rejects(waiter, /no longer wanted/);
  assert.equal(started, false);
  assert.equal(slots.running('a'), 0);
});

test('resolver slots: a lookup that throws at once frees its slot', async () => {
  const slots = new ResolverSlots(1);
  await assert.rejects(slots.run('a', 'name5', () => { throw new Error('bad host'); }, () => true), /bad host/);
  assert.equal(slots.running('a'), 0);
  assert.equal(await slots.run('a', 'name6', async () => 'next', () => true), 'next');
});

test('resolver slots: a long queue is pruned of waiters no longer wanted', async () => {
  const slots = new ResolverSlots(1);
  const first = pending();
  void slots.run('a', 'name7', () => first.promise, () => true);
  const abandoned = Array.from({ length: 64 }, () => slots.run('a', 'name8', async () => 'never', () => false));
  for (const run of abandoned) run.catch(() => {});
  void slots.run('a', 'name9', async () => 'wanted', () => true);
  assert.equal(slots.waiting('a'), 1, 'the 64 abandoned waiters were dropped when the 65th joined');
  await Promise.allSettled(abandoned);
  first.settle('done');
});

// Regression (review3): lookups of one name share a thread, so they share a slot too; counted
// apart, CONNECTs to one dead name took every slot of their identity.
test('resolver slots: lookups of a name already running share it and take no slot; waiters of one name start one lookup', async () => {
  const slots = new ResolverSlots(2);
  const dead = pending();
  let started = 0;
  const deadRuns = Array.from({ length: 5 }, () => slots.run('a', 'dead', () => (started++, dead.promise), () => true));
  assert.deepEqual([started, slots.running('a'), slots.waiting('a')], [1, 1, 0]);
  const other = pending();
  const otherRun = slots.run('a', 'other', () => (started++, other.promise), () => true);
  assert.equal(started, 2, 'the second slot went to another name');
  const queued = Array.from({ length: 3 }, () => slots.run('a', 'third', () => (started++, Promise.resolve('third')), () => true));
  assert.deepEqual([started, slots.waiting('a')], [2, 3]);
  other.settle('other');
  assert.equal(await otherRun, 'other');
  assert.deepEqual(await Promise.all(queued), ['third', 'third', 'third']);
  assert.equal(started, 3, 'the three waiters of one name started one lookup');
  dead.settle('dead');
  assert.deepEqual(await Promise.all(deadRuns), ['dead', 'dead', 'dead', 'dead', 'dead']);
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual([slots.running('a'), slots.waiting('a')], [0, 0], 'nothing kept');
});
