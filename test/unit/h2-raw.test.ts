// Proves test/helpers/h2-raw.ts: HPACK/Huffman against RFC 7541 Appendix C, frame layout and
// reassembly, and a live node:http2 server answering raw frames the way the gateway tests use them.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import tls, { type TLSSocket } from 'node:tls';
import { after, afterEach, before, describe, test } from 'node:test';
import {
  CLIENT_PREFACE,
  ErrorCode,
  Flag,
  FrameParser,
  FrameType,
  HpackDecoder,
  RawH2,
  Setting,
  connectHeaders,
  connectRaw,
  continuationFrame,
  dataFrame,
  frame,
  goawayFrame,
  headersFrame,
  hpackEncode,
  huffmanDecode,
  huffmanEncode,
  pingFrame,
  priorityFrame,
  rstStreamFrame,
  settingsAck,
  settingsFrame,
  windowUpdateFrame,
  type ConnectRawOptions,
} from '../helpers/h2-raw.js';
import { serverTls } from '../helpers/pki.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

describe('Huffman (RFC 7541 Appendix B / C.4, C.6)', () => {
  const vectors: Array<[string, string]> = [
    ['www.example.com', 'f1e3 c2e5 f23a 6ba0 ab90 f4ff'],
    ['no-cache', 'a8eb 1064 9cbf'],
    ['custom-key', '25a8 49e9 5ba9 7d7f'],
    ['custom-value', '25a8 49e9 5bb8 e8b4 bf'],
    ['302', '6402'],
    ['307', '640e ff'],
    ['private', 'aec3 771a 4b'],
    ['Mon, 21 Oct 2013 20:13:21 GMT', 'd07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff'],
    ['https://www.example.com', '9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3'],
    ['gzip', '9bd9 ab'],
    ['foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1', '94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07'],
  ];
  for (const [text, code] of vectors) {
    test(`decodes and encodes ${JSON.stringify(text)}`, () => {
      assert.equal(huffmanDecode(hex(code)).toString('latin1'), text);
      assert.deepEqual(huffmanEncode(text), hex(code));
    });
  }

  test('round-trips every octet value', () => {
    const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    assert.deepEqual(huffmanDecode(huffmanEncode(all)), all);
    assert.equal(huffmanDecode(Buffer.alloc(0)).length, 0);
  });

  test('rejects EOS, padding longer than 7 bits and padding that is not ones', () => {
    assert.throws(() => huffmanDecode(hex('ffff fffc')), /EOS/); // the 30-bit EOS code + 2 one bits
    assert.throws(() => huffmanDecode(hex('07ff')), /longer than 7 bits/); // '0' (00000) + 11 one bits
    assert.throws(() => huffmanDecode(hex('00')), /not a prefix of EOS/); // '0' then 3 zero bits
    assert.equal(huffmanDecode(hex('07')).toString(), '0'); // '0' then 3 one bits: valid padding
  });
});

describe('HPACK decoder (RFC 7541 Appendix C)', () => {
  test('C.3: requests without Huffman share one dynamic table', () => {
    const d = new HpackDecoder();
    assert.deepEqual(d.decode(hex('8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d')), [
      [':method', 'GET'],
      [':scheme', 'http'],
      [':path', '/'],
      [':authority', 'www.example.com'],
    ]);
    assert.equal(d.size, 57);
    assert.deepEqual(d.decode(hex('8286 84be 5808 6e6f 2d63 6163 6865')), [
      [':method', 'GET'],
      [':scheme', 'http'],
      [':path', '/'],
      [':authority', 'www.example.com'],
      ['cache-control', 'no-cache'],
    ]);
    assert.equal(d.size, 110);
    assert.deepEqual(d.decode(hex('8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65')), [
      [':method', 'GET'],
      [':scheme', 'https'],
      [':path', '/index.html'],
      [':authority', 'www.example.com'],
      ['custom-key', 'custom-value'],
    ]);
    assert.equal(d.size, 164);
    assert.deepEqual(d.dynamicTable, [
      ['custom-key', 'custom-value'],
      ['cache-control', 'no-cache'],
      [':authority', 'www.example.com'],
    ]);
  });

  test('C.4: the same requests with Huffman', () => {
    const d = new HpackDecoder();
    assert.deepEqual(d.decode(hex('8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff'))[3], [':authority', 'www.example.com']);
    assert.deepEqual(d.decode(hex('8286 84be 5886 a8eb 1064 9cbf'))[4], ['cache-control', 'no-cache']);
    assert.deepEqual(d.decode(hex('8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf'))[4], ['custom-key', 'custom-value']);
    assert.equal(d.size, 164);
  });

  test('C.6: responses with Huffman and eviction (table size 256)', () => {
    const d = new HpackDecoder(256);
    assert.deepEqual(d.decode(hex('4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3')), [
      [':status', '302'],
      ['cache-control', 'private'],
      ['date', 'Mon, 21 Oct 2013 20:13:21 GMT'],
      ['location', 'https://www.example.com'],
    ]);
    assert.equal(d.size, 222);
    assert.deepEqual(d.decode(hex('4883 640e ffc1 c0bf')), [
      [':status', '307'],
      ['cache-control', 'private'],
      ['date', 'Mon, 21 Oct 2013 20:13:21 GMT'],
      ['location', 'https://www.example.com'],
    ]);
    assert.equal(d.size, 222);
    assert.deepEqual(
      d.decode(
        hex(
          '88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07',
        ),
      ),
      [
        [':status', '200'],
        ['cache-control', 'private'],
        ['date', 'Mon, 21 Oct 2013 20:13:22 GMT'],
        ['location', 'https://www.example.com'],
        ['content-encoding', 'gzip'],
        ['set-cookie', 'foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1'],
      ],
    );
    assert.equal(d.size, 215);
    assert.deepEqual(
      d.dynamicTable.map(([name]) => name),
      ['set-cookie', 'content-encoding', 'date'],
    );
  });

  test('dynamic table size updates, never-indexed literals and errors', () => {
    const d = new HpackDecoder();
    d.decode(hex('4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf')); // custom-key: custom-value, indexed
    assert.equal(d.dynamicTable.length, 1);
    assert.deepEqual(d.decode(hex('be')), [['custom-key', 'custom-value']]);
    assert.deepEqual(d.decode(hex('20')), [], 'size update to 0 empties the table');
    assert.equal(d.size, 0);
    assert.throws(() => d.decode(hex('be')), /index 62/);
    assert.deepEqual(d.decode(hex('3fe11f 82')), [[':method', 'GET']], 'size update back to 4096 (multi-octet integer)');
    assert.equal(d.maxSize, 4096);
    assert.throws(() => new HpackDecoder().decode(hex('3fe21f')), /above the limit/);
    assert.throws(() => new HpackDecoder().decode(hex('82 20')), /after a header field/);
    assert.deepEqual(d.decode(hex('1003 6162 6303 7879 7a 0401 2f')), [
      ['abc', 'xyz'],
      [':path', '/'],
    ]);
    assert.equal(d.dynamicTable.length, 0, 'never-indexed and non-indexed literals leave the table alone');
    assert.throws(() => d.decode(hex('80')), /index 0/);
    assert.throws(() => d.decode(hex('41')), /truncated/);
    assert.throws(() => d.decode(hex('3fff')), /truncated/);
  });

  test('our encoder output decodes (plain and Huffman)', () => {
    const headers: Array<[string, string]> = [
      [':method', 'CONNECT'],
      [':authority', 'example.com:443'],
      ['proxy-authorization', 'x'.repeat(200)],
    ];
    assert.deepEqual(new HpackDecoder().decode(hpackEncode(headers)), headers);
    assert.deepEqual(new HpackDecoder().decode(hpackEncode(headers, { huffman: true })), headers);
  });
});

describe('frame encoders and parser', () => {
  test('frame layout', () => {
    assert.deepEqual(frame(FrameType.PING, 0, 0, Buffer.alloc(8)), hex('000008 06 00 00000000 0000000000000000'));
    assert.deepEqual(windowUpdateFrame(0, 0), hex('000004 08 00 00000000 00000000'));
    assert.deepEqual(windowUpdateFrame(3, 0x7fffffff), hex('000004 08 00 00000003 7fffffff'));
    assert.deepEqual(rstStreamFrame(5, ErrorCode.REFUSED_STREAM), hex('000004 03 00 00000005 00000007'));
    assert.deepEqual(goawayFrame(7, ErrorCode.PROTOCOL_ERROR, 'x'), hex('000009 07 00 00000000 00000007 00000001 78'));
    assert.deepEqual(settingsFrame([[Setting.INITIAL_WINDOW_SIZE, 65535], [Setting.ENABLE_PUSH, 0]]), hex('00000c 04 00 00000000 0004 0000ffff 0002 00000000'));
    assert.deepEqual(settingsAck(), hex('000000 04 01 00000000'));
    assert.deepEqual(pingFrame(Buffer.from('abcdefgh'), true), Buffer.concat([hex('000008 06 01 00000000'), Buffer.from('abcdefgh')]));
    assert.deepEqual(priorityFrame(3, { dependsOn: 1, weight: 256, exclusive: true }), hex('000005 02 00 00000003 80000001 ff'));
    assert.deepEqual(dataFrame(1, 'hi', { endStream: true }), hex('000002 00 01 00000001 6869'));
    assert.deepEqual(dataFrame(1, 'hi', { padLength: 2 }), hex('000005 00 08 00000001 02 6869 0000'));
    assert.deepEqual(frame(FrameType.DATA, 0, 1 | 0x80000000), hex('000000 00 00 80000001'), 'reserved bit can be set');
    assert.equal(CLIENT_PREFACE.toString(), 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
  });

  test('HEADERS / CONNECT / CONTINUATION', () => {
    const h = connectHeaders(1, 'example.com:443', [['x-a', 'b']]);
    assert.equal(h[3], FrameType.HEADERS);
    assert.equal(h[4], Flag.END_HEADERS);
    assert.equal(h.readUInt32BE(5), 1);
    assert.deepEqual(new HpackDecoder().decode(h.subarray(9)), [
      [':method', 'CONNECT'],
      [':authority', 'example.com:443'],
      ['x-a', 'b'],
    ]);
    const open = headersFrame(3, [['a', 'b']], { endStream: true, endHeaders: false, priority: { dependsOn: 1 }, padLength: 1 });
    assert.equal(open[4], Flag.END_STREAM | Flag.PADDED | Flag.PRIORITY);
    assert.equal(open.readUIntBE(0, 3), 1 + 5 + hpackEncode([['a', 'b']]).length + 1);
    const raw = headersFrame(5, hex('82'));
    assert.deepEqual(raw.subarray(9), hex('82'), 'a raw header block is sent as is');
    const cont = continuationFrame(3, [['c', 'd']]);
    assert.equal(cont[3], FrameType.CONTINUATION);
    assert.equal(cont[4], Flag.END_HEADERS);
  });

  test('the parser reassembles frames split anywhere and splits several in one chunk', () => {
    const bytes = Buffer.concat([settingsFrame([[Setting.MAX_CONCURRENT_STREAMS, 100]]), dataFrame(1, Buffer.alloc(20_000, 7)), pingFrame(), goawayFrame(1, 0)]);
    const oneByOne = new FrameParser();
    const seen = [...bytes].flatMap((b) => oneByOne.push(Buffer.from([b])));
    const whole = new FrameParser().push(bytes);
    for (const frames of [seen, whole]) {
      assert.deepEqual(
        frames.map((f) => [f.type, f.streamId, f.payload.length]),
        [
          [FrameType.SETTINGS, 0, 6],
          [FrameType.DATA, 1, 20_000],
          [FrameType.PING, 0, 8],
          [FrameType.GOAWAY, 0, 8],
        ],
      );
    }
    assert.equal(oneByOne.pending, 0);
    const partial = new FrameParser();
    assert.equal(partial.push(bytes.subarray(0, 20)).length, 1, 'the 15-octet SETTINGS frame');
    assert.equal(partial.pending, 5, 'the start of the DATA frame waits for the rest');
  });
});

describe('against a node:http2 server', { timeout: 15_000 }, () => {
  const PROXY_STATUS = 'agent-gateway; error=destination_ip_prohibited; details="203.0.113.7 is not allowed"';
  const BIG = Buffer.from(Array.from({ length: 40_000 }, (_, i) => i % 251));
  let server: http2.Http2SecureServer;
  let port = 0;
  let clientCert: { cert: string; key: string };
  let serverKeys: { cert: Buffer; key: Buffer };
  const sessions = new Set<http2.ServerHttp2Session>();
  const conns: RawH2[] = [];

  const connect = async (options: Partial<ConnectRawOptions> = {}): Promise<RawH2> => {
    const conn = await connectRaw({ port, ...options });
    conns.push(conn);
    return conn;
  };

  before(async () => {
    const files = await serverTls();
    const clientTls = await serverTls(['client.test']);
    clientCert = { cert: readFileSync(clientTls.certPath, 'utf8'), key: readFileSync(clientTls.keyPath, 'utf8') };
    serverKeys = { key: readFileSync(files.keyPath), cert: readFileSync(files.certPath) };
    server = http2.createSecureServer({ ...serverKeys, requestCert: true, rejectUnauthorized: false });
    server.on('sessionError', () => {});
    server.on('session', (session) => {
      sessions.add(session);
      session.on('error', () => {});
      session.on('close', () => sessions.delete(session));
    });
    server.on('stream', (stream, headers) => {
      stream.on('error', () => {});
      const ok = (): void => {
        stream.respond({ ':status': 200 });
        stream.end();
      };
      switch (headers[':authority']) {
        case 'ok.test:443':
          return ok();
        case 'deny.test:443':
          return stream.respond({ ':status': 403, 'proxy-status': PROXY_STATUS }, { endStream: true });
        case 'refuse.test:443':
          return stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
        case 'big.test:443':
          stream.respond({ ':status': 200 });
          return void stream.end(BIG);
        case 'echo.test:443':
          stream.respond({ ':status': 200 });
          return void stream.pipe(stream);
        case 'ping.test:443':
          return void stream.session?.ping((err) => (err ? stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR) : ok()));
        case 'settings.test:443':
          return void stream.session?.settings({ maxConcurrentStreams: 77 }, (err) => (err ? stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR) : ok()));
        case 'cert.test:443': {
          const peer = (stream.session?.socket as TLSSocket | undefined)?.getPeerCertificate();
          return stream.respond({ ':status': 200, 'x-peer-fingerprint': peer?.fingerprint256 ?? 'none' }, { endStream: true });
        }
        default:
          return stream.respond({ ':status': 404 }, { endStream: true });
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });

  afterEach(() => {
    for (const conn of conns.splice(0)) conn.destroy();
  });

  after(async () => {
    for (const session of sessions) session.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  test('CONNECT gets its 200 decoded; the server settings are ACKed and the stream ends', async () => {
    const conn = await connect();
    assert.equal(conn.alpnProtocol, 'h2');
    await conn.send(connectHeaders(1, 'ok.test:443'));
    const response = await conn.waitForResponse(1);
    assert.equal(response.status, 200);
    assert.equal(response.headers[':status'], '200');
    assert.ok(response.headers.date, 'node adds a date header');
    assert.equal(response.rst, undefined);
    assert.equal(await conn.waitForEndStream(1), true);
    const serverSettings = await conn.nextFrame((f) => f.type === FrameType.SETTINGS && !(f.flags & Flag.ACK));
    assert.equal(serverSettings.streamId, 0);
    await conn.nextFrame({ type: FrameType.SETTINGS, flags: Flag.ACK }); // the server ACKed our SETTINGS
    assert.equal(conn.errors.length, 0);
  });

  test('a 403 with proxy-status decodes exactly (Huffman-coded by nghttp2)', async () => {
    const conn = await connect();
    await conn.send(connectHeaders(1, 'deny.test:443'));
    const response = await conn.waitForResponse(1);
    assert.equal(response.status, 403);
    assert.equal(response.headers['proxy-status'], PROXY_STATUS);
    assert.equal(response.endStream, true);
    const headers = conn.frames.find((f) => f.type === FrameType.HEADERS && f.streamId === 1);
    assert.ok(headers);
    assert.ok(!headers.payload.includes('proxy-status') && !headers.payload.includes('destination_ip'), 'name and value travelled Huffman-coded');
  });

  test('several responses on one connection reuse the dynamic table', async () => {
    const conn = await connect();
    const ids = [1, 3, 5, 7];
    for (const id of ids) {
      await conn.send(connectHeaders(id, id === 5 ? 'ok.test:443' : 'deny.test:443'));
      const response = await conn.waitForResponse(id);
      assert.equal(response.status, id === 5 ? 200 : 403);
      if (id !== 5) assert.equal(response.headers['proxy-status'], PROXY_STATUS);
    }
    const blocks = conn.frames.filter((f) => f.type === FrameType.HEADERS);
    const [first, second] = blocks;
    assert.ok(first && second);
    assert.ok(second.payload.length < first.payload.length / 2, `second 403 block (${second.payload.length} B) is mostly indexed references, first was ${first.payload.length} B`);
    assert.ok(conn.hpack.dynamicTable.some(([name, value]) => name === 'proxy-status' && value === PROXY_STATUS));
  });

  test('SETTINGS_HEADER_TABLE_SIZE 0: the server sends a size update and indexes nothing', async () => {
    const conn = await connect({ settings: [[Setting.HEADER_TABLE_SIZE, 0]] });
    await conn.nextFrame({ type: FrameType.SETTINGS, flags: Flag.ACK });
    for (const id of [1, 3]) {
      await conn.send(connectHeaders(id, 'deny.test:443'));
      assert.equal((await conn.waitForResponse(id)).headers['proxy-status'], PROXY_STATUS);
    }
    assert.equal(conn.hpack.maxSize, 0);
    assert.deepEqual(conn.hpack.dynamicTable, []);
  });

  test('RST_STREAM from the server is reported', async () => {
    const conn = await connect();
    await conn.send(connectHeaders(1, 'refuse.test:443'));
    const response = await conn.waitForResponse(1);
    assert.equal(response.rst, ErrorCode.REFUSED_STREAM);
    assert.equal(response.status, undefined);
    assert.equal(await conn.waitForEndStream(1, 100), false);
  });

  test('DATA on stream 0 gets nghttp2 GOAWAY(PROTOCOL_ERROR) with debug data', async () => {
    const conn = await connect();
    await conn.send(dataFrame(0, 'x'));
    const goaway = await conn.waitForGoaway();
    assert.ok(goaway);
    assert.equal(goaway.code, ErrorCode.PROTOCOL_ERROR);
    assert.equal(goaway.lastStreamId, 0);
    assert.match(goaway.debug, /stream_id == 0/);
  });

  test('WINDOW_UPDATE 0 on stream 0 gets GOAWAY and the connection closes', async () => {
    const conn = await connect();
    await conn.send(windowUpdateFrame(0, 0));
    const goaway = await conn.waitForGoaway();
    assert.ok(goaway);
    // Node 22+ lets nghttp2 send GOAWAY(PROTOCOL_ERROR, "WINDOW_UPDATE: window_size_increment == 0");
    // Node 20 turns it into a session error and sends GOAWAY(INTERNAL_ERROR) without debug data.
    assert.ok(goaway.code === ErrorCode.PROTOCOL_ERROR || goaway.code === ErrorCode.INTERNAL_ERROR, `code ${goaway.code}`);
    assert.equal(goaway.lastStreamId, 0);
    assert.equal(await conn.waitForClose(), true);
    await conn.closed;
    assert.equal(await conn.write(pingFrame()), false, 'writes after close are dropped, not thrown');
    const late = await conn.waitForResponse(1, 100);
    assert.equal(late.goaway?.code, goaway.code);
  });

  test('the preface, SETTINGS and three CONNECTs in ONE write all get answered', async () => {
    const conn = await connect({ sendPreface: false });
    assert.equal(conn.writes, 0);
    await conn.send(CLIENT_PREFACE, settingsFrame([[Setting.ENABLE_PUSH, 0]]), connectHeaders(1, 'ok.test:443'), connectHeaders(3, 'deny.test:443'), connectHeaders(5, 'refuse.test:443'));
    assert.equal(conn.writes, 1);
    const [a, b, c] = await Promise.all([conn.waitForResponse(1), conn.waitForResponse(3), conn.waitForResponse(5)]);
    assert.equal(a.status, 200);
    assert.equal(b.headers['proxy-status'], PROXY_STATUS);
    assert.equal(c.rst, ErrorCode.REFUSED_STREAM);
  });

  test('a header block split over HEADERS + CONTINUATION is accepted', async () => {
    const conn = await connect();
    const block = hpackEncode([
      [':method', 'CONNECT'],
      [':authority', 'ok.test:443'],
    ]);
    await conn.send(headersFrame(1, block.subarray(0, 5), { endHeaders: false }), continuationFrame(1, block.subarray(5)));
    assert.equal((await conn.waitForResponse(1)).status, 200);
  });

  test('server PINGs and SETTINGS are answered automatically', async () => {
    const conn = await connect();
    await conn.send(connectHeaders(1, 'ping.test:443'), connectHeaders(3, 'settings.test:443'));
    assert.equal((await conn.waitForResponse(1)).status, 200);
    assert.equal((await conn.waitForResponse(3)).status, 200);
    assert.ok(conn.frames.some((f) => f.type === FrameType.PING && !(f.flags & Flag.ACK)));
  });

  test('with auto-ACK off, the server PING goes unanswered', async () => {
    const conn = await connect({ autoPingAck: false });
    await conn.send(connectHeaders(1, 'ping.test:443'));
    const ping = await conn.nextFrame(FrameType.PING);
    assert.equal(ping.flags & Flag.ACK, 0);
    await assert.rejects(conn.nextFrame({ type: FrameType.HEADERS, streamId: 1 }, 150), /no matching frame within 150 ms/);
    await conn.send(pingFrame(ping.payload, true));
    assert.equal((await conn.waitForResponse(1)).status, 200);
  });

  test('large DATA arrives across TLS records and reads, reassembled', async () => {
    const conn = await connect();
    await conn.send(connectHeaders(1, 'big.test:443'));
    assert.equal(await conn.waitForEndStream(1), true);
    assert.deepEqual(conn.streamData(1), BIG);
    assert.ok(conn.frames.some((f) => f.type === FrameType.DATA && f.payload.length === 16_384), 'max-size DATA frames (larger than one TLS record)');
  });

  test('tunnel data flows both ways; auto WINDOW_UPDATE keeps a long transfer going', async () => {
    const conn = await connect({ autoWindowUpdate: true });
    await conn.send(connectHeaders(1, 'echo.test:443'));
    assert.equal((await conn.waitForResponse(1)).status, 200);
    const chunk = Buffer.alloc(16_000, 0x61);
    for (let i = 0; i < 6; i++) await conn.send(dataFrame(1, chunk)); // 96 000 B > the 65 535 B initial windows
    await conn.send(dataFrame(1, 'end', { endStream: true }));
    assert.equal(await conn.waitForEndStream(1), true);
    assert.equal(conn.streamData(1).length, 6 * 16_000 + 3);
  });

  test('the client certificate is presented', async () => {
    const conn = await connect(clientCert);
    await conn.send(connectHeaders(1, 'cert.test:443'));
    const response = await conn.waitForResponse(1);
    assert.equal(response.headers['x-peer-fingerprint'], new X509Certificate(clientCert.cert).fingerprint256);
    const anonymous = await connect();
    await anonymous.send(connectHeaders(1, 'cert.test:443'));
    assert.equal((await anonymous.waitForResponse(1)).headers['x-peer-fingerprint'], 'none');
  });

  test('resetTcp() / end() / destroy() all close the connection without client errors', async () => {
    for (const close of [(c: RawH2) => c.resetTcp(), (c: RawH2) => c.end(), (c: RawH2) => c.destroy()]) {
      const conn = await connect();
      await conn.send(connectHeaders(1, 'ok.test:443'));
      await conn.waitForResponse(1);
      close(conn);
      assert.equal(await conn.waitForClose(), true);
      assert.deepEqual(conn.errors, []);
    }
  });

  test('resetTcp() is a TCP RST (ECONNRESET at a plain TLS server; node:http2 closes its session quietly)', async () => {
    const seen: string[] = [];
    const sockets = new Set<TLSSocket>();
    const plain = tls.createServer({ key: serverKeys.key, cert: serverKeys.cert, ALPNProtocols: ['h2'] }, (socket) => {
      sockets.add(socket);
      socket.on('error', (err: NodeJS.ErrnoException) => seen.push(err.code ?? err.message));
      socket.on('close', (hadError) => seen.push(hadError ? 'close-after-error' : 'close'));
      socket.resume(); // read (and discard) so FIN / RST are noticed
    });
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    try {
      const plainPort = (plain.address() as AddressInfo).port;
      for (const [close, expected] of [
        [(c: RawH2) => c.resetTcp(), ['ECONNRESET', 'close-after-error']],
        [(c: RawH2) => c.end(), ['close']],
      ] as const) {
        seen.length = 0;
        const conn = await connect({ port: plainPort });
        await new Promise((resolve) => setTimeout(resolve, 20)); // let the server take the preface
        close(conn);
        const deadline = Date.now() + 1000;
        while (!seen.some((event) => event.startsWith('close')) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
        assert.deepEqual(seen, expected);
      }
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => plain.close(() => resolve()));
    }
  });

  test('timeouts: waits resolve or reject promptly when nothing comes', async () => {
    const conn = await connect();
    await conn.nextFrame(FrameType.SETTINGS);
    assert.equal(await conn.waitForGoaway(50), null);
    assert.equal(await conn.waitForClose(50), false);
    await assert.rejects(conn.waitForResponse(1, 50), /nothing within 50 ms/);
    conn.destroy();
    await assert.rejects(conn.nextFrame(FrameType.GOAWAY), /closed without a matching frame/);
  });

  test('connectRaw rejects when nothing listens', async () => {
    const probe = http2.createSecureServer({});
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const freePort = (probe.address() as AddressInfo).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    await assert.rejects(connectRaw({ port: freePort }), /ECONNREFUSED/);
  });
});
