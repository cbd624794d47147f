/**
 * gateway/src/bag.ts (the set the gateway keeps CONNECT-rate objects in instead of a Set) and the
 * tunnel tracker built on it: membership, positions after swap-removal, walks that see the members
 * of their start however the bag changes meanwhile, and the tracker's indexes.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Bag, type BagSlot } from '../../gateway/src/bag.js';
import { TunnelTracker, authorisationKey, type OpenTunnel } from '../../gateway/src/tunnels.js';
import type { Tunnel } from '../../gateway/src/tunnel.js';

interface Item {
  readonly name: string;
  slot?: number;
  other?: number;
}
const SLOT: BagSlot<Item> = { get: (item) => item.slot, set: (item, position) => (item.slot = position) };
const OTHER: BagSlot<Item> = { get: (item) => item.other, set: (item, position) => (item.other = position) };
const items = (n: number): Item[] => Array.from({ length: n }, (_, i) => ({ name: `i${i}` }));
const names = (bag: Iterable<Item>): string[] => [...bag].map((item) => item.name).sort();

test('bag: add, has and delete, each answering whether it changed anything', () => {
  const bag = new Bag(SLOT);
  const [a, b, c] = items(3) as [Item, Item, Item];
  assert.equal(bag.add(a), true);
  assert.equal(bag.add(b), true);
  assert.equal(bag.add(a), false, 'a second add of a member');
  assert.equal(bag.size, 2);
  assert.equal(bag.has(a), true);
  assert.equal(bag.has(c), false, 'never added');
  assert.equal(bag.delete(c), false, 'never added');
  assert.equal(bag.delete(a), true);
  assert.equal(bag.delete(a), false, 'a second delete');
  assert.equal(bag.has(a), false);
  assert.deepEqual(names(bag), ['i1']);
  assert.equal(a.slot, -1, 'a removed item holds no position');
});

test('bag: every order of removal leaves exactly the others, at positions that find them', () => {
  // Removing from the front, the back and the middle moves the last member into the hole.
  for (const order of [
    [0, 1, 2, 3, 4],
    [4, 3, 2, 1, 0],
    [2, 0, 4, 1, 3],
    [1, 3, 0, 4, 2],
  ]) {
    const bag = new Bag(SLOT);
    const all = items(5);
    for (const item of all) bag.add(item);
    const left = new Set(all);
    for (const index of order) {
      assert.equal(bag.delete(all[index]!), true, `delete i${index} (order ${order})`);
      left.delete(all[index]!);
      assert.equal(bag.size, left.size);
      for (const item of all) assert.equal(bag.has(item), left.has(item), `${item.name} after deleting i${index} (order ${order})`);
      assert.deepEqual(names(bag), names(left));
    }
    assert.equal(bag.any(), undefined, 'empty');
  }
});

test('bag: an item may be in two bags, each keeping its own position', () => {
  const first = new Bag(SLOT);
  const second = new Bag(OTHER);
  const all = items(4);
  for (const item of all) first.add(item);
  for (const item of [...all].reverse()) second.add(item);
  first.delete(all[0]!);
  second.delete(all[3]!);
  assert.deepEqual(names(first), ['i1', 'i2', 'i3']);
  assert.deepEqual(names(second), ['i0', 'i1', 'i2']);
  for (const item of all.slice(1, 3)) {
    assert.equal(first.has(item), true);
    assert.equal(second.has(item), true);
  }
});

test('bag: an item with the same field in another bag is not taken for a member', () => {
  const one = new Bag(SLOT);
  const two = new Bag(SLOT);
  const [a, b] = items(2) as [Item, Item];
  one.add(a);
  two.add(b);
  // Both hold position 0 in their own bag: b is not in `one`.
  assert.equal(one.has(b), false);
  assert.equal(one.delete(b), false);
  assert.deepEqual(names(one), ['i0']);
});

test('bag: a walk sees the members of its start, whatever is added or removed during it', () => {
  const bag = new Bag(SLOT);
  const all = items(6);
  for (const item of all.slice(0, 5)) bag.add(item);
  const seen: string[] = [];
  for (const item of bag) {
    seen.push(item.name);
    // What revocation and shutdown do: closing a tunnel removes it (and maybe others) mid-walk.
    bag.delete(item);
    if (item.name === 'i1') bag.delete(all[3]!);
    bag.add(all[5]!);
  }
  assert.deepEqual(seen.sort(), ['i0', 'i1', 'i2', 'i3', 'i4']);
  assert.deepEqual(names(bag), ['i5']);
});

function openTunnel(n: number, identity: string, destination: string, permissionId: string): OpenTunnel & { closedWith: string[] } {
  const closedWith: string[] = [];
  return {
    connectId: `c${n}`,
    identity,
    spkiFingerprint: `fp-${identity}`,
    spkiDer: Buffer.from(identity),
    destination,
    permissionId,
    openedAt: Date.now(),
    // Only close() is reached here: the tracker's closeAll() calls it.
    tunnel: { close: (detail: string) => (closedWith.push(detail), true) } as unknown as Tunnel,
    reportedUp: 0,
    reportedDown: 0,
    closedWith,
  };
}

test('tunnel tracker: the key and permission indexes follow adds and deletes, and forget emptied keys', () => {
  const tracker = new TunnelTracker();
  const a1 = openTunnel(1, 'alpha', 'docs:443', 'p1');
  const a2 = openTunnel(2, 'alpha', 'docs:443', 'p1');
  const a3 = openTunnel(3, 'alpha', 'mail:443', 'p2');
  const b1 = openTunnel(4, 'beta', 'docs:443', 'p3');
  for (const open of [a1, a2, a3, b1]) tracker.add(open);
  tracker.add(a1); // twice: counted once
  assert.equal(tracker.size, 4);
  const alphaDocs = authorisationKey('alpha', 'fp-alpha', 'docs:443');
  assert.deepEqual([...tracker.byAuthorisationKey().keys()].sort(), [alphaDocs, authorisationKey('alpha', 'fp-alpha', 'mail:443'), authorisationKey('beta', 'fp-beta', 'docs:443')].sort());
  assert.equal(tracker.byAuthorisationKey().get(alphaDocs)?.size, 2);
  assert.deepEqual([...tracker.byPermission('p1')].map((o) => o.connectId).sort(), ['c1', 'c2']);
  assert.equal(tracker.byPermission('nope').size, 0);
  assert.equal(tracker.byPermission('nope').any(), undefined);

  assert.equal(tracker.delete(a1), true);
  assert.equal(tracker.delete(a1), false);
  assert.equal(tracker.byAuthorisationKey().get(alphaDocs)?.any(), a2);
  assert.equal(tracker.delete(a2), true);
  assert.equal(tracker.byAuthorisationKey().has(alphaDocs), false, 'a key with no tunnel left is forgotten');
  assert.equal(tracker.byPermission('p1').size, 0);
  assert.deepEqual([...tracker].map((o) => o.connectId).sort(), ['c3', 'c4']);

  // Shutdown: every tunnel closed once, even though closing one removes it from the tracker.
  const closing = new TunnelTracker();
  const all = [1, 2, 3, 4].map((n) => openTunnel(n, n < 3 ? 'alpha' : 'beta', 'docs:443', `p${n}`));
  for (const open of all) {
    const closedWith = open.closedWith;
    (open as { tunnel: unknown }).tunnel = { close: (detail: string) => (closing.delete(open), closedWith.push(detail), true) };
    closing.add(open);
  }
  assert.equal(closing.closeAll('shutting_down'), 4);
  for (const open of all) assert.deepEqual(open.closedWith, ['shutting_down']);
  assert.equal(closing.size, 0);
});
