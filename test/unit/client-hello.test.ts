/**
 * The ClientHello reader behind `[egress] sni` (DESIGN §9c): real ClientHellos from Node's TLS
 * client, split over records and segments, the mode table, and a fuzz run.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { MAX_CLIENT_HELLO_BYTES, parseClientHello, sniVerdict } from '../../gateway/src/client-hello.js';
import { realClientHello } from '../helpers/client-hello.js';

/** The same handshake message re-framed into records of at most `size` bytes. */
function reframe(hello: Buffer, size: number): Buffer {
  const body = hello.subarray(5, 5 + hello.readUInt16BE(3));
  const records: Buffer[] = [];
  for (let at = 0; at < body.length; at += size) {
    const part = body.subarray(at, at + size);
    records.push(Buffer.from([0x16, 0x03, 0x01, part.length >> 8, part.length & 0xff]), part);
  }
  return Buffer.concat(records);
}

const DOCS = await realClientHello('docs.example.com');
const UPPER = await realClientHello('Docs.Example.COM');
const NONE = await realClientHello(undefined);

test('client hello: the server_name of a real ClientHello, lowercased; none without SNI', () => {
  assert.deepEqual(parseClientHello(DOCS), { kind: 'client_hello', serverName: 'docs.example.com' });
  assert.deepEqual(parseClientHello(UPPER), { kind: 'client_hello', serverName: 'docs.example.com' });
  assert.deepEqual(parseClientHello(NONE), { kind: 'client_hello', serverName: undefined });
});

test('client hello: split over records of 1, 7 and 100 bytes, and fed one segment at a time', () => {
  for (const size of [1, 7, 100]) {
    const framed = reframe(DOCS, size);
    assert.deepEqual(parseClientHello(framed), { kind: 'client_hello', serverName: 'docs.example.com' }, `records of ${size}`);
    for (const cut of [1, 4, 5, 6, Math.floor(framed.length / 2), framed.length - 1]) {
      assert.deepEqual(parseClientHello(framed.subarray(0, cut)), { kind: 'incomplete' }, `records of ${size}, first ${cut} bytes`);
    }
  }
});

test('client hello: other protocols are not TLS; broken handshakes are invalid', () => {
  assert.equal(parseClientHello(Buffer.from('GET / HTTP/1.1\r\n')).kind, 'not_tls');
  assert.equal(parseClientHello(Buffer.from('SSH-2.0-OpenSSH\r\n')).kind, 'not_tls');
  assert.equal(parseClientHello(Buffer.from([0x16, 0x10, 0x00, 0x00, 0x01, 0x01])).kind, 'not_tls', 'record version 16.0: no server reads it as TLS');
  assert.equal(parseClientHello(Buffer.from([0x81, 0x02, 0x03])).kind, 'not_tls', 'top bit set, but not an SSLv2 CLIENT-HELLO');
  const serverHello = Buffer.from(DOCS);
  serverHello[5] = 0x02;
  assert.equal(parseClientHello(serverHello).kind, 'invalid');
  const huge = Buffer.from([0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff]);
  assert.deepEqual(parseClientHello(huge), { kind: 'invalid', why: `ClientHello of ${0xffffff + 4} bytes` });
  assert.equal(parseClientHello(reframe(DOCS, 50).subarray(0, 60)).kind, 'incomplete');
  assert.equal(parseClientHello(Buffer.concat([reframe(DOCS, 50).subarray(0, 55), Buffer.from([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])])).kind, 'invalid');
});

/** `hello` behind another first record, or with its record version rewritten. */
const withPrefix = (hex: string, hello: Buffer) => Buffer.concat([Buffer.from(hex, 'hex'), hello]);
function withRecordVersion(hello: Buffer, major: number, minor: number): Buffer {
  const out = Buffer.from(hello);
  out[1] = major;
  out[2] = minor;
  return out;
}
/** An SSLv2-format CLIENT-HELLO offering TLS 1.2 (OpenSSL servers still read it; it has no extensions). */
const SSL2 = (() => {
  const ciphers = Buffer.from('00c02b00c02f00002f0000350000ff', 'hex');
  const body = Buffer.concat([Buffer.from([0x01, 0x03, 0x03, 0x00, ciphers.length, 0x00, 0x00, 0x00, 32]), ciphers, Buffer.alloc(32, 0x11)]);
  return Buffer.concat([Buffer.from([0x80 | (body.length >> 8), body.length & 0xff]), body]);
})();

// Regression: a first record a server reads but the reader took for another protocol let `match`
// pass the ClientHello behind it whatever its server_name (each was checked against a real server:
// OpenSSL takes any 3.x record version and skips empty change_cipher_spec records before the
// ClientHello; Go takes record versions below 16.0 and skips warning alerts).
test('client hello: unusual record versions and records in front of the ClientHello are still TLS', () => {
  const OTHER = reframe(DOCS, 1000);
  for (const [major, minor] of [[3, 5], [3, 0xff], [0, 1], [2, 0]] as const) {
    assert.deepEqual(parseClientHello(withRecordVersion(OTHER, major, minor)), { kind: 'client_hello', serverName: 'docs.example.com' }, `record version ${major}.${minor}`);
  }
  for (const prefix of ['1403030000', '140303000101', '15030300020100', '1503030000', '1703030000', '1803030000']) {
    assert.equal(parseClientHello(withPrefix(prefix, DOCS)).kind, 'invalid', `${prefix} in front`);
  }
  assert.equal(parseClientHello(Buffer.from([0x15])).kind, 'incomplete');
  assert.deepEqual(parseClientHello(SSL2), { kind: 'client_hello', serverName: undefined });
  assert.equal(parseClientHello(SSL2.subarray(0, 2)).kind, 'incomplete');
});

/**
 * First messages of protocols that are not TLS, whose first bytes fall in the TLS record range
 * (content type 20-24, a version byte below 16) or have the top bit set: a MySQL
 * HandshakeResponse41 (3-byte little-endian length, sequence 1, client capabilities) of 276 to 280
 * bytes, a MongoDB message (little-endian int32 length, request id 1) of 278 bytes, and an
 * unframed Thrift compact call (protocol id 0x82, CALL, seqid 1, method "add").
 */
function mysqlResponse(length: number): Buffer {
  const payload = Buffer.alloc(length, 0x61);
  payload.writeUInt32LE(0x000fa68d, 0); // CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | ...
  return Buffer.concat([Buffer.from([length & 0xff, length >> 8, 0x00, 0x01]), payload]);
}
const MONGO = (() => {
  const out = Buffer.alloc(278, 0x62);
  out.writeInt32LE(278, 0);
  out.writeInt32LE(1, 4); // requestID
  out.writeInt32LE(0, 8); // responseTo
  out.writeInt32LE(2013, 12); // OP_MSG
  return out;
})();
const THRIFT_COMPACT = Buffer.concat([Buffer.from([0x82, 0x21, 0x01, 0x03]), Buffer.from('add'), Buffer.from([0x15, 0x02, 0x15, 0x04, 0x00])]);

// Regression: the reader took these for TLS records (or an SSLv2 CLIENT-HELLO) that were not a
// ClientHello and refused them under `match`, although no TLS server reads them as one: OpenSSL,
// BoringSSL and rustls take only record version 3.x; Go takes others, but only a non-empty
// handshake record starting a ClientHello, or a 2-byte alert, first; OpenSSL takes an SSLv2
// CLIENT-HELLO only for version 3.x and with its three lengths adding up to the record's.
test('client hello: other protocols whose first bytes look like a TLS record or an SSLv2 hello are not TLS', () => {
  for (let length = 276; length <= 280; length++) assert.equal(parseClientHello(mysqlResponse(length)).kind, 'not_tls', `MySQL handshake response of ${length} bytes`);
  assert.equal(parseClientHello(MONGO).kind, 'not_tls', 'MongoDB message of 278 bytes');
  assert.equal(parseClientHello(THRIFT_COMPACT).kind, 'not_tls', 'Thrift compact call');
  const badVersion = Buffer.from(SSL2);
  badVersion[3] = 0x00;
  assert.equal(parseClientHello(badVersion).kind, 'not_tls', 'SSLv2 CLIENT-HELLO for version 0.x');
  const badLengths = Buffer.from(SSL2);
  badLengths[6] = badLengths[6]! + 3;
  assert.equal(parseClientHello(badLengths).kind, 'not_tls', 'SSLv2 CLIENT-HELLO whose lengths do not add up');
  // Still TLS: what Go reads before a ClientHello with another record version.
  assert.equal(parseClientHello(withPrefix('15010000020101', DOCS)).kind, 'invalid', 'a 2-byte alert of version 1.0 first');
  assert.equal(parseClientHello(withRecordVersion(DOCS, 1, 0)).kind, 'client_hello', 'record version 1.0');
  assert.equal(parseClientHello(SSL2.subarray(0, 10)).kind, 'incomplete', 'SSLv2 lengths not all read yet');
  assert.equal(parseClientHello(withRecordVersion(DOCS, 1, 0).subarray(0, 5)).kind, 'incomplete', 'record version 1.0, no handshake byte yet');
});

const CASES: readonly { name: string; data: Buffer; mode: 'match' | 'require'; host: string; ip?: boolean; ended?: boolean; verdict: string }[] = [
  { name: 'match: same name', data: DOCS, mode: 'match', host: 'docs.example.com', verdict: 'pass' },
  { name: 'match: case differs only', data: UPPER, mode: 'match', host: 'docs.example.com', verdict: 'pass' },
  { name: 'match: another name (fronting)', data: DOCS, mode: 'match', host: 'api.example.com', verdict: 'refuse' },
  { name: 'match: no server_name for a hostname', data: NONE, mode: 'match', host: 'docs.example.com', verdict: 'refuse' },
  { name: 'match: no server_name for an IP literal', data: NONE, mode: 'match', host: '93.184.216.34', ip: true, verdict: 'pass' },
  { name: 'match: a name for an IP literal', data: DOCS, mode: 'match', host: '93.184.216.34', ip: true, verdict: 'refuse' },
  { name: 'match: not TLS', data: Buffer.from('EHLO x\r\n'), mode: 'match', host: 'mail.example.com', verdict: 'pass' },
  { name: 'require: not TLS', data: Buffer.from('EHLO x\r\n'), mode: 'require', host: 'mail.example.com', verdict: 'refuse' },
  { name: 'require: same name', data: DOCS, mode: 'require', host: 'docs.example.com', verdict: 'pass' },
  { name: 'match: half a ClientHello', data: DOCS.subarray(0, 40), mode: 'match', host: 'docs.example.com', verdict: 'wait' },
  { name: 'match: half a ClientHello, then the client ends', data: DOCS.subarray(0, 40), mode: 'match', host: 'docs.example.com', ended: true, verdict: 'refuse' },
  { name: 'match: nothing at all, then the client ends', data: Buffer.alloc(0), mode: 'match', host: 'docs.example.com', ended: true, verdict: 'pass' },
  { name: 'match: 16 KiB + 5 bytes without a complete ClientHello', data: Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x40, 0x00]), Buffer.alloc(16 * 1024 - 4)]), mode: 'match', host: 'docs.example.com', verdict: 'refuse' },
  { name: 'match: record version 3.5 for another name', data: withRecordVersion(DOCS, 3, 5), mode: 'match', host: 'api.example.com', verdict: 'refuse' },
  { name: 'match: an empty change_cipher_spec, then the same name', data: withPrefix('1403030000', DOCS), mode: 'match', host: 'docs.example.com', verdict: 'refuse' },
  { name: 'match: a warning alert, then the same name', data: withPrefix('1503030002015a', DOCS), mode: 'match', host: 'docs.example.com', verdict: 'refuse' },
  { name: 'match: an SSLv2 ClientHello (no server_name) for a hostname', data: SSL2, mode: 'match', host: 'docs.example.com', verdict: 'refuse' },
  { name: 'match: an SSLv2 ClientHello for an IP literal', data: SSL2, mode: 'match', host: '93.184.216.34', ip: true, verdict: 'pass' },
  { name: 'match: a MySQL handshake response of 278 bytes (server spoke first)', data: mysqlResponse(278), mode: 'match', host: 'db.example.com', verdict: 'pass' },
  { name: 'match: a MongoDB message of 278 bytes', data: MONGO, mode: 'match', host: 'db.example.com', verdict: 'pass' },
  { name: 'require: a MySQL handshake response of 278 bytes', data: mysqlResponse(278), mode: 'require', host: 'db.example.com', verdict: 'refuse' },
  { name: 'require: nothing at all, then the client ends', data: Buffer.alloc(0), mode: 'require', host: 'docs.example.com', ended: true, verdict: 'refuse' },
];

for (const c of CASES) {
  test(`sni verdict: ${c.name} → ${c.verdict}`, () => {
    assert.equal(sniVerdict(c.data, c.mode, c.host, c.ip ?? false, c.ended ?? false).kind, c.verdict);
  });
}

test('client hello fuzz: 100,000 random and mutated inputs, never a throw, always a known kind', () => {
  const kinds = new Set(['incomplete', 'not_tls', 'invalid', 'client_hello']);
  const seeds = [DOCS, UPPER, NONE, reframe(DOCS, 13)];
  const counts: Record<string, number> = {};
  const started = performance.now();
  for (let i = 0; i < 100_000; i++) {
    let input: Buffer;
    const seed = seeds[i % seeds.length]!;
    switch (i % 4) {
      case 0: // random bytes behind a handshake record header
        input = Buffer.concat([Buffer.from([0x16, 0x03, 0x01]), randomBytes(2 + (i % 600))]);
        break;
      case 1: // a few byte flips
        input = Buffer.from(seed);
        for (let f = 0; f < 1 + (i % 5); f++) { const at = (i * 7919 + f * 104729) % input.length; input[at] = input[at]! ^ (1 + (i % 255)); }
        break;
      case 2: // truncated or extended
        input = i % 8 === 2 ? seed.subarray(0, i % seed.length) : Buffer.concat([seed, randomBytes(i % 64)]);
        break;
      default: // a random length field rewritten
        input = Buffer.from(seed);
        input.writeUInt16BE(i % 65536, Math.min(input.length - 2, 3 + ((i * 31) % 200)));
    }
    const result = parseClientHello(input);
    assert.ok(kinds.has(result.kind));
    counts[result.kind] = (counts[result.kind] ?? 0) + 1;
  }
  console.log(`# fuzz: 100,000 inputs in ${(performance.now() - started).toFixed(0)} ms: ${JSON.stringify(counts)}`);
  assert.ok(MAX_CLIENT_HELLO_BYTES === 16 * 1024 + 5);
});
