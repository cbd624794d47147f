/**
 * The PROXY protocol v2 parser (gateway/src/proxy-protocol.ts): known-good headers, every refusal
 * by name, and fuzz-style runs over truncated, mutated and random input: the parser either waits
 * for more bytes, returns a header no longer than its input, or throws ProxyHeaderError. Nothing
 * else, ever.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { crc32c, encodeProxyV2, MAX_PROXY_V2_PAYLOAD, parseProxyV2, PROXY_V2_SIGNATURE, ProxyHeaderError, type ParseResult, type ProxyHeader, type ProxyRefusal } from '../../gateway/src/proxy-protocol.js';

const V4: ProxyHeader = { command: 'proxy', family: 'inet', source: { address: '203.0.113.7', port: 40123 }, destination: { address: '192.0.2.1', port: 8443 } };
const V6: ProxyHeader = { command: 'proxy', family: 'inet6', source: { address: '2001:db8::7', port: 1 }, destination: { address: 'fe80::1:2', port: 65535 } };

/** Written out by hand from the specification's layout: TCP over IPv4, 127.0.0.1:51234 → 127.0.0.1:8443, no TLV (what HAProxy's `send-proxy-v2` sends; test/scale/ checks the real one). */
const SPEC_EXAMPLE = Buffer.from('0d0a0d0a000d0a515549540a2111000c7f0000017f000001c82220fb', 'hex');

function refusal(bytes: Buffer): ProxyRefusal {
  try {
    parseProxyV2(bytes);
  } catch (error) {
    assert.ok(error instanceof ProxyHeaderError, `not a ProxyHeaderError: ${String(error)}`);
    return error.reason;
  }
  assert.fail('accepted');
}

function withByte(bytes: Buffer, index: number, value: number): Buffer {
  const copy = Buffer.from(bytes);
  copy[index] = value;
  return copy;
}

test('parses IPv4 and IPv6 PROXY headers, a hand-written example and LOCAL, leaving the client bytes after them', () => {
  const tail = Buffer.from([0x16, 0x03, 0x01]);
  for (const header of [V4, V6]) {
    const bytes = Buffer.concat([encodeProxyV2(header), tail]);
    const result = parseProxyV2(bytes);
    assert.ok(result.done);
    assert.deepEqual(result.header, header);
    assert.deepEqual(bytes.subarray(result.length), tail);
  }
  const captured = parseProxyV2(SPEC_EXAMPLE);
  assert.deepEqual(captured, { done: true, length: 28, header: { command: 'proxy', family: 'inet', source: { address: '127.0.0.1', port: 51234 }, destination: { address: '127.0.0.1', port: 8443 } } });
  assert.deepEqual(parseProxyV2(encodeProxyV2({ command: 'local' })), { done: true, length: 16, header: { command: 'local' } });
  // LOCAL with an address block (HAProxy's check-send-proxy): the block is skipped.
  const local = encodeProxyV2(V4);
  local[12] = 0x20;
  assert.deepEqual(parseProxyV2(local), { done: true, length: local.length, header: { command: 'local' } });
  // LOCAL naming a family but sending no addresses: the family is ignored, as the specification
  // requires (it was refused as bad_length). Its TLVs are still framed.
  for (const family of [0x11, 0x21, 0x31]) {
    assert.deepEqual(parseProxyV2(withByte(encodeProxyV2({ command: 'local' }), 13, family)), { done: true, length: 16, header: { command: 'local' } }, `family byte ${family}`);
    const tlv = withByte(encodeProxyV2({ command: 'local' }, [{ type: 0x04, value: Buffer.alloc(2) }]), 13, family);
    assert.deepEqual(parseProxyV2(tlv), { done: true, length: 21, header: { command: 'local' } });
    assert.equal(refusal(withByte(tlv, 18, 0x09)), 'bad_tlv', 'a TLV overrunning a LOCAL header is still refused');
  }
});

test('LOCAL naming IPv4 with no addresses but 12 or more bytes of TLVs is accepted (regression: its TLVs were read from byte 12 and refused)', () => {
  for (const size of [9, 10, 20, 33]) {
    // One NOOP TLV of 3 + size bytes, at least the 12 an IPv4 address block would take.
    const bytes = withByte(encodeProxyV2({ command: 'local' }, [{ type: 0x04, value: Buffer.alloc(size, 0xab) }]), 13, 0x11);
    assert.deepEqual(parseProxyV2(bytes), { done: true, length: 16 + 3 + size, header: { command: 'local' } }, `${size}-byte TLV`);
  }
  // With the addresses sent, its TLVs still read after them.
  const withAddresses = encodeProxyV2(V4, [{ type: 0x04, value: Buffer.alloc(12) }]);
  withAddresses[12] = 0x20;
  assert.deepEqual(parseProxyV2(withAddresses), { done: true, length: withAddresses.length, header: { command: 'local' } });
  // Framing that holds neither way is still refused.
  const neither = withByte(encodeProxyV2({ command: 'local' }, [{ type: 0x04, value: Buffer.alloc(12, 0xff) }]), 13, 0x11);
  neither[18] = 0x40; // from byte 0 the TLV now claims 64 bytes; from byte 12, type 0xff claims 65,535
  assert.equal(refusal(neither), 'bad_tlv');
});

test('an IPv4-mapped IPv6 source reads as Node writes a dual-stack peer (::ffff:a.b.c.d), not in hex groups', () => {
  const mapped = encodeProxyV2({ command: 'proxy', family: 'inet6', source: { address: '::ffff:c633:6417', port: 1 }, destination: { address: '::1', port: 2 } });
  const result = parseProxyV2(mapped);
  assert.ok(result.done && result.header.command === 'proxy');
  assert.equal(result.header.source.address, '::ffff:198.51.100.23');
  assert.equal(result.header.destination.address, '::1');
});

test('TLVs: unknown types skipped, a matching CRC32C accepted, a wrong one or bad framing refused', () => {
  const noop = encodeProxyV2(V4, [{ type: 0x04, value: Buffer.alloc(5) }, { type: 0xe0, value: Buffer.from('x') }]);
  assert.ok(parseProxyV2(noop).done);
  const withCrc = encodeProxyV2(V4, [{ type: 0x03, value: Buffer.alloc(4) }]);
  withCrc.writeUInt32BE(crc32c(withCrc), withCrc.length - 4);
  assert.ok(parseProxyV2(withCrc).done);
  assert.equal(refusal(withByte(withCrc, withCrc.length - 1, withCrc.at(-1)! ^ 1)), 'bad_checksum');
  assert.equal(refusal(encodeProxyV2(V4, [{ type: 0x03, value: Buffer.alloc(3) }])), 'bad_tlv');
  // A TLV claiming more than the header holds; two stray bytes after the address block.
  const overrun = encodeProxyV2(V4, [{ type: 0x05, value: Buffer.alloc(2) }]);
  overrun.writeUInt16BE(9, overrun.length - 4);
  assert.equal(refusal(overrun), 'bad_tlv');
  const stray = Buffer.concat([encodeProxyV2(V4), Buffer.alloc(2)]);
  stray.writeUInt16BE(14, 14);
  assert.equal(refusal(stray), 'bad_tlv');
  // CRC-32C check value (RFC 3720 B.4: 32 bytes of zeros).
  assert.equal(crc32c(Buffer.alloc(32)), 0x8a9136aa);
});

test('refusals, each by its reason', () => {
  const good = encodeProxyV2(V4);
  const cases: [string, Buffer, ProxyRefusal][] = [
    ['TLS ClientHello', Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00]), 'missing'],
    ['HTTP', Buffer.from('GET / HTTP/1.1\r\n'), 'missing'],
    ['v1', Buffer.from('PROXY TCP4 203.0.113.7 192.0.2.1 40123 8443\r\n'), 'v1'],
    ['v1 prefix', Buffer.from('PROX'), 'v1'],
    ['signature off by one bit', withByte(good, 11, 0x0b), 'missing'],
    ['version 1 in the binary form', withByte(good, 12, 0x11), 'bad_version'],
    ['version 3', withByte(good, 12, 0x31), 'bad_version'],
    ['command 2', withByte(good, 12, 0x22), 'bad_command'],
    ['UDP', withByte(good, 13, 0x12), 'bad_family'],
    ['UNIX stream', withByte(good, 13, 0x31), 'bad_family'],
    ['UNSPEC with PROXY', withByte(good, 13, 0x00), 'bad_family'],
    ['family 4', withByte(good, 13, 0x41), 'bad_family'],
    ['length 65535', withByte(withByte(good, 14, 0xff), 15, 0xff), 'bad_length'],
    [`length ${MAX_PROXY_V2_PAYLOAD + 1}`, (() => { const b = Buffer.from(good); b.writeUInt16BE(MAX_PROXY_V2_PAYLOAD + 1, 14); return b; })(), 'bad_length'],
    ['IPv4 block cut short', withByte(good, 15, 11), 'bad_length'],
    ['IPv6 family, IPv4 length', withByte(good, 13, 0x21), 'bad_length'],
  ];
  for (const [name, bytes, reason] of cases) assert.equal(refusal(bytes), reason, name);
  // Refused from the 13th byte on, without waiting for the rest.
  assert.equal(refusal(Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x31])])), 'bad_version');
});

test('every strict prefix of a valid header waits for more; the whole header never reads past itself', () => {
  for (const header of [
    encodeProxyV2(V4),
    encodeProxyV2(V6),
    encodeProxyV2({ command: 'local' }),
    encodeProxyV2(V6, [{ type: 0x01, value: Buffer.from('h2') }, { type: 0x02, value: Buffer.from('gateway.example') }]),
    SPEC_EXAMPLE,
  ]) {
    for (let n = 0; n < header.length; n++) assert.deepEqual(parseProxyV2(header.subarray(0, n)), { done: false }, `prefix ${n}/${header.length}`);
    const result = parseProxyV2(Buffer.concat([header, randomBytes(64)]));
    assert.ok(result.done && result.length === header.length);
  }
});

/** The only outcomes allowed for any input. */
function checkOutcome(bytes: Buffer): void {
  let result: ParseResult;
  try {
    result = parseProxyV2(bytes);
  } catch (error) {
    assert.ok(error instanceof ProxyHeaderError, `threw ${String(error)} for ${bytes.toString('hex')}`);
    return;
  }
  if (result.done) {
    assert.ok(result.length >= 16 && result.length <= bytes.length && result.length <= 16 + MAX_PROXY_V2_PAYLOAD);
    if (result.header.command === 'proxy') assert.ok(result.header.source.port >= 0 && result.header.source.port <= 65535);
  }
}

test('fuzz: mutated, truncated and random headers only ever wait, parse within bounds, or refuse', () => {
  const seeds = [encodeProxyV2(V4), encodeProxyV2(V6), encodeProxyV2(V4, [{ type: 0x03, value: Buffer.alloc(4) }, { type: 0x04, value: Buffer.alloc(3) }]), SPEC_EXAMPLE];
  for (let i = 0; i < 20_000; i++) {
    const seed = Buffer.from(seeds[i % seeds.length]!);
    // 1-3 random byte changes anywhere after the signature (before it, everything is 'missing').
    for (let k = 0; k <= i % 3; k++) seed[12 + ((i * 7919 + k * 104729) % (seed.length - 12))] = randomBytes(1)[0]!;
    const cut = seed.subarray(0, (i * 31) % (seed.length + 1));
    checkOutcome(seed);
    checkOutcome(cut);
    checkOutcome(Buffer.concat([PROXY_V2_SIGNATURE, randomBytes(i % 80)]));
    checkOutcome(randomBytes(i % 40));
  }
});
