/** ByteHold (gateway/src/byte-hold.ts): client bytes copied into one buffer of their own, bounded. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ByteHold } from '../../gateway/src/byte-hold.js';

test('bytes are copied (not Node\'s chunk kept), in order; the capacity doubles from 1 KiB up to the bound', () => {
  const hold = new ByteHold(64 * 1024);
  assert.equal(hold.capacity, 0);
  const read = Buffer.alloc(16 * 1024, 0x7a); // a whole TLS read of which one byte is ours
  assert.equal(hold.append(read.subarray(0, 1)), true);
  assert.equal(hold.capacity, 1024);
  assert.notEqual(hold.bytes().buffer, read.buffer, 'a copy: the 16 KiB read is not kept alive');
  const rows: [number, number][] = [[1023, 1024], [1, 2048], [3000, 4096], [60_000, 65_536]];
  let expected = Buffer.from('z');
  for (const [more, capacity] of rows) {
    const chunk = Buffer.alloc(more, more % 251);
    assert.equal(hold.append(chunk), true);
    expected = Buffer.concat([expected, chunk]);
    assert.equal(hold.capacity, capacity, `after ${more} more`);
  }
  assert.deepEqual(hold.bytes(), expected);
  assert.equal(hold.size, 64_025);
});

test('past the bound nothing of the chunk is kept; capacityFor says so first', () => {
  const hold = new ByteHold(100);
  assert.equal(hold.capacityFor(100), 1024, 'at least 1 KiB, even for a small bound');
  assert.equal(hold.append(Buffer.alloc(60, 1)), true);
  assert.equal(hold.capacityFor(41), undefined);
  assert.equal(hold.append(Buffer.alloc(41, 2)), false);
  assert.equal(hold.size, 60);
  assert.equal(hold.append(Buffer.alloc(40, 3)), true);
  assert.equal(hold.size, 100);
  hold.clear();
  assert.equal(hold.size, 0);
  assert.equal(hold.capacity, 0);
  assert.equal(hold.bytes().length, 0);
});
