// A raw HTTP/2 client over TLS for hostile-peer tests: it writes whatever frames a test builds
// (valid or not, several in one write) and records every frame the server sends, decoding header
// blocks with its own HPACK decoder. It never throws asynchronously: socket errors are collected
// in `errors` (an ECONNRESET from a server that drops the connection is normal here).
//
// Dependency-free on purpose: node:net, node:tls and a minimal HPACK (RFC 7541) below.
import * as net from 'node:net';
import * as tls from 'node:tls';

// ---------------------------------------------------------------------------------------------
// Constants (RFC 9113)

export const FrameType = {
  DATA: 0x0,
  HEADERS: 0x1,
  PRIORITY: 0x2,
  RST_STREAM: 0x3,
  SETTINGS: 0x4,
  PUSH_PROMISE: 0x5,
  PING: 0x6,
  GOAWAY: 0x7,
  WINDOW_UPDATE: 0x8,
  CONTINUATION: 0x9,
} as const;

export const Flag = {
  END_STREAM: 0x1,
  /** SETTINGS and PING. */
  ACK: 0x1,
  END_HEADERS: 0x4,
  PADDED: 0x8,
  PRIORITY: 0x20,
} as const;

export const ErrorCode = {
  NO_ERROR: 0x0,
  PROTOCOL_ERROR: 0x1,
  INTERNAL_ERROR: 0x2,
  FLOW_CONTROL_ERROR: 0x3,
  SETTINGS_TIMEOUT: 0x4,
  STREAM_CLOSED: 0x5,
  FRAME_SIZE_ERROR: 0x6,
  REFUSED_STREAM: 0x7,
  CANCEL: 0x8,
  COMPRESSION_ERROR: 0x9,
  CONNECT_ERROR: 0xa,
  ENHANCE_YOUR_CALM: 0xb,
  INADEQUATE_SECURITY: 0xc,
  HTTP_1_1_REQUIRED: 0xd,
} as const;

export const Setting = {
  HEADER_TABLE_SIZE: 0x1,
  ENABLE_PUSH: 0x2,
  MAX_CONCURRENT_STREAMS: 0x3,
  INITIAL_WINDOW_SIZE: 0x4,
  MAX_FRAME_SIZE: 0x5,
  MAX_HEADER_LIST_SIZE: 0x6,
  ENABLE_CONNECT_PROTOCOL: 0x8,
} as const;

/** The client connection preface (RFC 9113 §3.4); a SETTINGS frame must follow it. */
export const CLIENT_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');

const FRAME_NAMES = ['DATA', 'HEADERS', 'PRIORITY', 'RST_STREAM', 'SETTINGS', 'PUSH_PROMISE', 'PING', 'GOAWAY', 'WINDOW_UPDATE', 'CONTINUATION'];

// ---------------------------------------------------------------------------------------------
// Huffman code (RFC 7541 Appendix B)
//
// The code is canonical: sorting symbols by (code length, symbol) and counting upwards yields the
// Appendix B codes exactly, so only the lengths are listed (symbol 256 is EOS).

const HUFFMAN_LENGTHS: readonly number[] = [
  13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0-15
  28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16-31
  6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // 32-47   ' ' .. '/'
  5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // 48-63   '0' .. '?'
  13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // 64-79   '@' .. 'O'
  7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 80-95   'P' .. '_'
  15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // 96-111  '`' .. 'o'
  6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 112-127 'p' .. DEL
  20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128-143
  24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144-159
  22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160-175
  21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176-191
  26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192-207
  19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208-223
  20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224-239
  26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240-255
  30, // 256 EOS
];

const EOS = 256;

/** HUFFMAN_CODES[sym] is the code of `sym`, HUFFMAN_LENGTHS[sym] bits long (most significant first). */
export const HUFFMAN_CODES: readonly number[] = (() => {
  const symbols = HUFFMAN_LENGTHS.map((_, sym) => sym).sort((a, b) => len(a) - len(b) || a - b);
  const codes: number[] = new Array<number>(HUFFMAN_LENGTHS.length).fill(0);
  let code = 0;
  let previous = len(symbols[0] ?? 0);
  for (const sym of symbols) {
    code *= 2 ** (len(sym) - previous);
    previous = len(sym);
    codes[sym] = code;
    code += 1;
  }
  return codes;
  function len(sym: number): number {
    return HUFFMAN_LENGTHS[sym] ?? 0;
  }
})();

// Decoding tree: node 0 is the root; child[2n] / child[2n+1] are the 0 / 1 branches of node n
// (0 = no child); leaf[n] is the symbol at node n, or -1.
const TREE = (() => {
  const child = new Int32Array(2 * 2 * 257);
  const leaf = new Int32Array(2 * 257).fill(-1);
  let nodes = 1;
  HUFFMAN_LENGTHS.forEach((length, sym) => {
    const code = HUFFMAN_CODES[sym] ?? 0;
    let node = 0;
    for (let i = length - 1; i >= 0; i--) {
      const bit = Math.floor(code / 2 ** i) % 2;
      const slot = 2 * node + bit;
      let next = child[slot] ?? 0;
      if (next === 0) {
        next = nodes++;
        child[slot] = next;
      }
      node = next;
    }
    leaf[node] = sym;
  });
  return { child, leaf };
})();

/** Decodes a Huffman-coded string; throws on EOS inside the string or invalid padding (RFC 7541 §5.2). */
export function huffmanDecode(data: Uint8Array): Buffer {
  const out: number[] = [];
  let node = 0;
  let pendingBits = 0; // bits consumed since the last complete symbol
  let pendingAllOnes = true;
  for (const byte of data) {
    for (let i = 7; i >= 0; i--) {
      const bit = (byte >> i) & 1;
      node = TREE.child[2 * node + bit] ?? 0;
      pendingBits += 1;
      pendingAllOnes &&= bit === 1;
      if (node === 0) throw new Error('HPACK: invalid Huffman code');
      const sym = TREE.leaf[node] ?? -1;
      if (sym === EOS) throw new Error('HPACK: EOS symbol inside a Huffman-coded string');
      if (sym >= 0) {
        out.push(sym);
        node = 0;
        pendingBits = 0;
        pendingAllOnes = true;
      }
    }
  }
  if (pendingBits > 7) throw new Error('HPACK: Huffman padding longer than 7 bits');
  if (!pendingAllOnes) throw new Error('HPACK: Huffman padding is not a prefix of EOS');
  return Buffer.from(out);
}

/** Huffman-encodes `data`, padding the last octet with the most significant bits of EOS (ones). */
export function huffmanEncode(data: Uint8Array | string): Buffer {
  const input = typeof data === 'string' ? Buffer.from(data, 'latin1') : data;
  const out: number[] = [];
  let acc = 0; // < 2^(7 + 30): plain arithmetic, not 32-bit bit operations
  let bits = 0;
  for (const byte of input) {
    const length = HUFFMAN_LENGTHS[byte] ?? 0;
    acc = acc * 2 ** length + (HUFFMAN_CODES[byte] ?? 0);
    bits += length;
    while (bits >= 8) {
      bits -= 8;
      const unit = 2 ** bits;
      out.push(Math.floor(acc / unit));
      acc %= unit;
    }
  }
  if (bits > 0) out.push(acc * 2 ** (8 - bits) + (2 ** (8 - bits) - 1));
  return Buffer.from(out);
}

// ---------------------------------------------------------------------------------------------
// HPACK (RFC 7541)

export type HeaderList = Array<[string, string]>;
export type HeaderInput = ReadonlyArray<readonly [string, string]>;

/** RFC 7541 Appendix A. */
export const HPACK_STATIC_TABLE: ReadonlyArray<readonly [string, string]> = [
  [':authority', ''],
  [':method', 'GET'],
  [':method', 'POST'],
  [':path', '/'],
  [':path', '/index.html'],
  [':scheme', 'http'],
  [':scheme', 'https'],
  [':status', '200'],
  [':status', '204'],
  [':status', '206'],
  [':status', '304'],
  [':status', '400'],
  [':status', '404'],
  [':status', '500'],
  ['accept-charset', ''],
  ['accept-encoding', 'gzip, deflate'],
  ['accept-language', ''],
  ['accept-ranges', ''],
  ['accept', ''],
  ['access-control-allow-origin', ''],
  ['age', ''],
  ['allow', ''],
  ['authorization', ''],
  ['cache-control', ''],
  ['content-disposition', ''],
  ['content-encoding', ''],
  ['content-language', ''],
  ['content-length', ''],
  ['content-location', ''],
  ['content-range', ''],
  ['content-type', ''],
  ['cookie', ''],
  ['date', ''],
  ['etag', ''],
  ['expect', ''],
  ['expires', ''],
  ['from', ''],
  ['host', ''],
  ['if-match', ''],
  ['if-modified-since', ''],
  ['if-none-match', ''],
  ['if-range', ''],
  ['if-unmodified-since', ''],
  ['last-modified', ''],
  ['link', ''],
  ['location', ''],
  ['max-forwards', ''],
  ['proxy-authenticate', ''],
  ['proxy-authorization', ''],
  ['range', ''],
  ['referer', ''],
  ['refresh', ''],
  ['retry-after', ''],
  ['server', ''],
  ['set-cookie', ''],
  ['strict-transport-security', ''],
  ['transfer-encoding', ''],
  ['user-agent', ''],
  ['vary', ''],
  ['via', ''],
  ['www-authenticate', ''],
];

/** An HPACK integer with an N-bit prefix (RFC 7541 §5.1); `high` holds the bits above the prefix. */
export function hpackInteger(value: number, prefixBits: number, high = 0): Buffer {
  const max = 2 ** prefixBits - 1;
  if (value < max) return Buffer.from([high | value]);
  const out = [high | max];
  let rest = value - max;
  while (rest >= 128) {
    out.push((rest % 128) + 128);
    rest = Math.floor(rest / 128);
  }
  out.push(rest);
  return Buffer.from(out);
}

/** An HPACK string literal (RFC 7541 §5.2), optionally Huffman-coded. */
export function hpackString(value: string | Uint8Array, huffman = false): Buffer {
  const raw = typeof value === 'string' ? Buffer.from(value, 'latin1') : Buffer.from(value);
  const body = huffman ? huffmanEncode(raw) : raw;
  return Buffer.concat([hpackInteger(body.length, 7, huffman ? 0x80 : 0), body]);
}

/**
 * Encodes a header list as "literal header field without indexing — new name" representations,
 * which leave the server's dynamic table untouched. Names are sent exactly as given (no lowercasing),
 * so tests can send malformed fields.
 */
export function hpackEncode(headers: HeaderInput, options: { huffman?: boolean } = {}): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of headers) parts.push(Buffer.from([0x00]), hpackString(name, options.huffman), hpackString(value, options.huffman));
  return Buffer.concat(parts);
}

interface DynamicEntry {
  readonly name: string;
  readonly value: string;
  readonly size: number;
}

/** One per connection: the dynamic table is connection state. Strings are decoded as latin1 (octets). */
export class HpackDecoder {
  private entries: DynamicEntry[] = []; // newest first
  /** Current dynamic table size in RFC 7541 §4.1 octets (name + value + 32 per entry). */
  size = 0;
  /** Current maximum size (changed by the encoder's dynamic table size updates). */
  maxSize: number;
  /** The SETTINGS_HEADER_TABLE_SIZE this side advertised: size updates above it are errors. */
  maxSizeLimit: number;

  constructor(maxSizeLimit = 4096) {
    this.maxSizeLimit = maxSizeLimit;
    this.maxSize = maxSizeLimit;
  }

  /** Dynamic table entries, newest first (index 62 first). */
  get dynamicTable(): Array<[string, string]> {
    return this.entries.map((e) => [e.name, e.value]);
  }

  decode(block: Uint8Array): HeaderList {
    const buf = Buffer.from(block.buffer, block.byteOffset, block.byteLength);
    const headers: HeaderList = [];
    let pos = 0;
    const integer = (prefixBits: number): number => {
      const first = buf[pos];
      if (first === undefined) throw new Error('HPACK: truncated integer');
      pos += 1;
      const max = 2 ** prefixBits - 1;
      let value = first & max;
      if (value < max) return value;
      for (let shift = 0; ; shift += 7) {
        const byte = buf[pos];
        if (byte === undefined) throw new Error('HPACK: truncated integer');
        pos += 1;
        value += (byte & 0x7f) * 2 ** shift;
        if (value > 0xffffffff) throw new Error('HPACK: integer overflow');
        if ((byte & 0x80) === 0) return value;
      }
    };
    const string = (): string => {
      const first = buf[pos];
      if (first === undefined) throw new Error('HPACK: truncated string');
      const huffman = (first & 0x80) !== 0;
      const length = integer(7);
      if (pos + length > buf.length) throw new Error('HPACK: truncated string');
      const raw = buf.subarray(pos, pos + length);
      pos += length;
      return (huffman ? huffmanDecode(raw) : raw).toString('latin1');
    };
    const lookup = (index: number): readonly [string, string] => {
      if (index === 0) throw new Error('HPACK: index 0');
      const fromStatic = HPACK_STATIC_TABLE[index - 1];
      if (fromStatic) return fromStatic;
      const entry = this.entries[index - HPACK_STATIC_TABLE.length - 1];
      if (!entry) throw new Error(`HPACK: index ${index} beyond the tables`);
      return [entry.name, entry.value];
    };

    while (pos < buf.length) {
      const first = buf[pos] ?? 0;
      if (first & 0x80) {
        // Indexed header field (§6.1).
        headers.push([...lookup(integer(7))]);
      } else if (first & 0x40) {
        // Literal with incremental indexing (§6.2.1).
        const index = integer(6);
        const name = index === 0 ? string() : lookup(index)[0];
        const value = string();
        headers.push([name, value]);
        this.insert(name, value);
      } else if (first & 0x20) {
        // Dynamic table size update (§6.3): only at the start of a block.
        if (headers.length > 0) throw new Error('HPACK: dynamic table size update after a header field');
        const size = integer(5);
        if (size > this.maxSizeLimit) throw new Error(`HPACK: table size update ${size} above the limit ${this.maxSizeLimit}`);
        this.maxSize = size;
        this.evict(0);
      } else {
        // Literal without indexing (0000) or never indexed (0001) (§6.2.2, §6.2.3).
        const index = integer(4);
        const name = index === 0 ? string() : lookup(index)[0];
        headers.push([name, string()]);
      }
    }
    return headers;
  }

  private insert(name: string, value: string): void {
    const size = Buffer.byteLength(name, 'latin1') + Buffer.byteLength(value, 'latin1') + 32;
    this.evict(size);
    if (size > this.maxSize) return; // an entry larger than the table empties it (§4.4)
    this.entries.unshift({ name, value, size });
    this.size += size;
  }

  private evict(room: number): void {
    while (this.size + room > this.maxSize) {
      const last = this.entries.pop();
      if (!last) break;
      this.size -= last.size;
    }
  }
}

export function headerRecord(headers: HeaderInput): Record<string, string> {
  const record: Record<string, string> = {};
  for (const [name, value] of headers) record[name] = name in record ? `${record[name]}, ${value}` : value;
  return record;
}

// ---------------------------------------------------------------------------------------------
// Frame encoders (pure; concatenate them to send several frames in one write)

function toBuffer(data: Uint8Array | string | undefined): Buffer {
  if (data === undefined) return Buffer.alloc(0);
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** The 9-octet frame header; `length` may lie about the payload that follows. */
export function frameHeader(length: number, type: number, flags: number, streamId: number): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(length, 0, 3);
  header[3] = type & 0xff;
  header[4] = flags & 0xff;
  header.writeUInt32BE(streamId >>> 0, 5); // pass streamId | 0x80000000 to set the reserved bit
  return header;
}

export function frame(type: number, flags: number, streamId: number, payload?: Uint8Array | string): Buffer {
  const body = toBuffer(payload);
  return Buffer.concat([frameHeader(body.length, type, flags, streamId), body]);
}

export interface PrioritySpec {
  dependsOn?: number;
  /** 1..256 (written as weight - 1); default 16. */
  weight?: number;
  exclusive?: boolean;
}

function priorityBytes(spec: PrioritySpec): Buffer {
  const out = Buffer.alloc(5);
  out.writeUInt32BE(((spec.dependsOn ?? 0) | (spec.exclusive ? 0x80000000 : 0)) >>> 0, 0);
  out[4] = ((spec.weight ?? 16) - 1) & 0xff;
  return out;
}

function padded(flags: number, body: Buffer, padLength: number | undefined): { flags: number; payload: Buffer } {
  if (padLength === undefined) return { flags, payload: body };
  return { flags: flags | Flag.PADDED, payload: Buffer.concat([Buffer.from([padLength & 0xff]), body, Buffer.alloc(padLength)]) };
}

export interface HeadersFrameOptions {
  endStream?: boolean;
  /** Default true; false leaves the block open for CONTINUATION frames. */
  endHeaders?: boolean;
  padLength?: number;
  priority?: PrioritySpec;
  /** Huffman-code the literal strings (only when `headers` is a list). */
  huffman?: boolean;
}

/** HEADERS carrying `headers` (HPACK-encoded without indexing) or a raw header block fragment. */
export function headersFrame(streamId: number, headers: HeaderInput | Uint8Array, options: HeadersFrameOptions = {}): Buffer {
  let block = headers instanceof Uint8Array ? toBuffer(headers) : hpackEncode(headers, { huffman: options.huffman ?? false });
  let flags = (options.endStream ? Flag.END_STREAM : 0) | (options.endHeaders ?? true ? Flag.END_HEADERS : 0);
  if (options.priority) {
    flags |= Flag.PRIORITY;
    block = Buffer.concat([priorityBytes(options.priority), block]);
  }
  const p = padded(flags, block, options.padLength);
  return frame(FrameType.HEADERS, p.flags, streamId, p.payload);
}

/** HEADERS for `CONNECT authority` (`:method`, `:authority`, then `extra`); END_STREAM unset unless asked. */
export function connectHeaders(streamId: number, authority: string, extra: HeaderInput = [], options: HeadersFrameOptions = {}): Buffer {
  return headersFrame(streamId, [[':method', 'CONNECT'], [':authority', authority], ...extra], options);
}

export function continuationFrame(streamId: number, headers: HeaderInput | Uint8Array, endHeaders = true): Buffer {
  const block = headers instanceof Uint8Array ? toBuffer(headers) : hpackEncode(headers);
  return frame(FrameType.CONTINUATION, endHeaders ? Flag.END_HEADERS : 0, streamId, block);
}

export function dataFrame(streamId: number, data?: Uint8Array | string, options: { endStream?: boolean; padLength?: number } = {}): Buffer {
  const p = padded(options.endStream ? Flag.END_STREAM : 0, toBuffer(data), options.padLength);
  return frame(FrameType.DATA, p.flags, streamId, p.payload);
}

export function priorityFrame(streamId: number, spec: PrioritySpec = {}): Buffer {
  return frame(FrameType.PRIORITY, 0, streamId, priorityBytes(spec));
}

export function rstStreamFrame(streamId: number, code: number = ErrorCode.CANCEL): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(code >>> 0, 0);
  return frame(FrameType.RST_STREAM, 0, streamId, payload);
}

/** SETTINGS with [identifier, value] entries, in order (duplicates and unknown ids allowed). */
export function settingsFrame(entries: ReadonlyArray<readonly [number, number]> = []): Buffer {
  const payload = Buffer.alloc(6 * entries.length);
  entries.forEach(([id, value], i) => {
    payload.writeUInt16BE(id & 0xffff, 6 * i);
    payload.writeUInt32BE(value >>> 0, 6 * i + 2);
  });
  return frame(FrameType.SETTINGS, 0, 0, payload);
}

export function settingsAck(): Buffer {
  return frame(FrameType.SETTINGS, Flag.ACK, 0);
}

/** PING; `data` is sent as given (8 octets are valid; default 8 zeros). */
export function pingFrame(data: Uint8Array | string = Buffer.alloc(8), ack = false): Buffer {
  return frame(FrameType.PING, ack ? Flag.ACK : 0, 0, data);
}

export function goawayFrame(lastStreamId: number, code: number = ErrorCode.NO_ERROR, debug: Uint8Array | string = ''): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(lastStreamId >>> 0, 0);
  head.writeUInt32BE(code >>> 0, 4);
  return frame(FrameType.GOAWAY, 0, 0, Buffer.concat([head, toBuffer(debug)]));
}

export function windowUpdateFrame(streamId: number, increment: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(increment >>> 0, 0);
  return frame(FrameType.WINDOW_UPDATE, 0, streamId, payload);
}

// ---------------------------------------------------------------------------------------------
// Frame parsing

export interface H2Frame {
  readonly type: number;
  readonly flags: number;
  /** Reserved bit cleared. */
  readonly streamId: number;
  readonly payload: Buffer;
  /** HEADERS / PUSH_PROMISE: the decoded block, set once END_HEADERS arrived (possibly via CONTINUATION). */
  headers?: HeaderList;
  /** HEADERS / PUSH_PROMISE: why the block could not be decoded. */
  hpackError?: string;
}

export interface GoawayInfo {
  lastStreamId: number;
  code: number;
  debug: string;
}

/** Splits a byte stream into frames, however the bytes are chunked. */
export class FrameParser {
  private buffered: Buffer = Buffer.alloc(0);

  /** Bytes held back waiting for the rest of a frame. */
  get pending(): number {
    return this.buffered.length;
  }

  push(chunk: Uint8Array): H2Frame[] {
    this.buffered = this.buffered.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.buffered, chunk]);
    const frames: H2Frame[] = [];
    while (this.buffered.length >= 9) {
      const length = this.buffered.readUIntBE(0, 3);
      if (this.buffered.length < 9 + length) break;
      frames.push({
        type: this.buffered[3] ?? 0,
        flags: this.buffered[4] ?? 0,
        streamId: this.buffered.readUInt32BE(5) & 0x7fffffff,
        payload: Buffer.from(this.buffered.subarray(9, 9 + length)),
      });
      this.buffered = this.buffered.subarray(9 + length);
    }
    return frames;
  }
}

export function frameName(type: number): string {
  return FRAME_NAMES[type] ?? `UNKNOWN(0x${type.toString(16)})`;
}

export function describeFrame(f: H2Frame): string {
  let extra = '';
  if (f.type === FrameType.RST_STREAM) extra = ` code=${rstCode(f)}`;
  else if (f.type === FrameType.GOAWAY) {
    const g = parseGoaway(f);
    extra = ` last=${g.lastStreamId} code=${g.code}${g.debug ? ` debug=${JSON.stringify(g.debug)}` : ''}`;
  } else if (f.headers) extra = ` ${JSON.stringify(f.headers)}`;
  else if (f.hpackError) extra = ` hpackError=${f.hpackError}`;
  return `${frameName(f.type)} stream=${f.streamId} flags=0x${f.flags.toString(16)} len=${f.payload.length}${extra}`;
}

export function parseGoaway(f: H2Frame): GoawayInfo {
  if (f.payload.length < 8) return { lastStreamId: -1, code: -1, debug: '' };
  return { lastStreamId: f.payload.readUInt32BE(0) & 0x7fffffff, code: f.payload.readUInt32BE(4), debug: f.payload.subarray(8).toString('latin1') };
}

/** The error code of an RST_STREAM (-1 if malformed). */
export function rstCode(f: H2Frame): number {
  return f.payload.length >= 4 ? f.payload.readUInt32BE(0) : -1;
}

/** Payload of a DATA frame without padding. */
export function dataPayload(f: H2Frame): Buffer {
  if (!(f.flags & Flag.PADDED)) return f.payload;
  const padLength = f.payload[0] ?? 0;
  return f.payload.subarray(1, Math.max(1, f.payload.length - padLength));
}

/** The header block fragment of a HEADERS / PUSH_PROMISE / CONTINUATION frame. */
function headerFragment(f: H2Frame): Buffer {
  if (f.type === FrameType.CONTINUATION) return f.payload;
  let start = 0;
  let end = f.payload.length;
  if (f.flags & Flag.PADDED) {
    start = 1;
    end -= f.payload[0] ?? 0;
  }
  if (f.type === FrameType.HEADERS && f.flags & Flag.PRIORITY) start += 5;
  if (f.type === FrameType.PUSH_PROMISE) start += 4;
  return f.payload.subarray(start, Math.max(start, end));
}

// ---------------------------------------------------------------------------------------------
// The connection

export interface ConnectRawOptions {
  port: number;
  /** Default 127.0.0.1. */
  host?: string;
  /** Client certificate chain and key (PEM). */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** SNI; defaults to `host` when it is a name (never an IP address). */
  servername?: string;
  /** Write the client preface + SETTINGS(settings) once TLS is up. Default true. */
  sendPreface?: boolean;
  /** Entries of the initial SETTINGS frame (default none); a HEADER_TABLE_SIZE also sets `hpack.maxSizeLimit`. */
  settings?: ReadonlyArray<readonly [number, number]>;
  /** ACK the server's SETTINGS frames. Default true (changeable later via `autoSettingsAck`). */
  autoSettingsAck?: boolean;
  /** Answer PINGs with PING ACK. Default true. */
  autoPingAck?: boolean;
  /** Return every DATA octet as WINDOW_UPDATE (connection + stream). Default false. */
  autoWindowUpdate?: boolean;
  /** Default ['h2']. */
  alpn?: string[];
  /** Give up on the TCP + TLS handshake after this long. Default 5000 ms. */
  connectTimeoutMs?: number;
  /** Extra node:tls options (e.g. minVersion, ciphers). */
  tls?: tls.ConnectionOptions;
}

export interface H2Response {
  /** `:status`, when the server sent response HEADERS. */
  status?: number;
  /** The decoded response header fields (pseudo-headers included); repeated names joined by ', '. */
  headers: Record<string, string>;
  headerList: HeaderList;
  /** The response HEADERS carried END_STREAM. */
  endStream: boolean;
  /** RST_STREAM error code, when the server reset the stream instead. */
  rst?: number;
  /** The server sent GOAWAY (an error, or a lastStreamId below the stream) before answering. */
  goaway?: GoawayInfo;
  /** The connection closed before any answer. */
  closed?: boolean;
}

export type FrameFilter = number | ((f: H2Frame) => boolean) | { type?: number; streamId?: number; flags?: number };

function matches(filter: FrameFilter | undefined, f: H2Frame): boolean {
  if (filter === undefined) return true;
  if (typeof filter === 'number') return f.type === filter;
  if (typeof filter === 'function') return filter(f);
  return (filter.type === undefined || f.type === filter.type) && (filter.streamId === undefined || f.streamId === filter.streamId) && (filter.flags === undefined || (f.flags & filter.flags) === filter.flags);
}

const DEFAULT_WAIT_MS = 2000;

export class RawH2 {
  readonly socket: tls.TLSSocket;
  /** The TCP socket under TLS. */
  readonly tcp: net.Socket;
  /** Every frame received, in order. */
  readonly frames: H2Frame[] = [];
  /** Socket errors (never thrown). */
  readonly errors: Error[] = [];
  /** This connection's HPACK decoder (header blocks are decoded as they arrive, in order). */
  readonly hpack = new HpackDecoder();
  /** Resolves when the connection has closed (never rejects). */
  readonly closed: Promise<void>;
  isClosed = false;
  /** The server half-closed (TCP FIN / TLS close) before we closed. */
  remoteEnded = false;
  /** Number of write() / send() calls handed to the socket, and their bytes. */
  writes = 0;
  bytesWritten = 0;
  autoSettingsAck: boolean;
  autoPingAck: boolean;
  autoWindowUpdate: boolean;

  /** end() / destroy() / resetTcp() was called: writes it cancels are not errors. */
  private closingLocally = false;
  private readonly parser = new FrameParser();
  private readonly consumed = new WeakSet<H2Frame>();
  private readonly listeners = new Set<() => void>();
  private openBlock: { frame: H2Frame; chunks: Buffer[] } | undefined;
  private resolveClosed!: () => void;

  /** Use connectRaw(); this attaches to sockets that are already connecting. */
  constructor(socket: tls.TLSSocket, tcp: net.Socket, options: Pick<ConnectRawOptions, 'autoSettingsAck' | 'autoPingAck' | 'autoWindowUpdate'> = {}) {
    this.socket = socket;
    this.tcp = tcp;
    this.autoSettingsAck = options.autoSettingsAck ?? true;
    this.autoPingAck = options.autoPingAck ?? true;
    this.autoWindowUpdate = options.autoWindowUpdate ?? false;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    const onError = (err: Error) => this.captureError(err);
    socket.on('error', onError);
    tcp.on('error', onError);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => (this.remoteEnded = true));
    socket.on('close', () => this.markClosed());
    tcp.on('close', () => this.markClosed());
  }

  /** The first socket error, if any. */
  get error(): Error | undefined {
    return this.errors[0];
  }

  get alpnProtocol(): string | false | null {
    return this.socket.alpnProtocol;
  }

  /** Writes raw bytes. Resolves true once handed to TCP, false if the socket is gone (never rejects). */
  write(data: Uint8Array | string): Promise<boolean> {
    const buf = toBuffer(typeof data === 'string' ? Buffer.from(data, 'latin1') : data);
    if (this.isClosed || this.socket.destroyed || !this.socket.writable) return Promise.resolve(false);
    this.writes += 1;
    this.bytesWritten += buf.length;
    return new Promise((resolve) => {
      try {
        this.socket.write(buf, (err) => {
          if (err) this.captureError(err);
          resolve(!err);
        });
      } catch (err) {
        this.captureError(err as Error);
        resolve(false);
      }
    });
  }

  /** Concatenates the frames (or any bytes) and writes them in ONE socket write. */
  send(...frames: Uint8Array[]): Promise<boolean> {
    return this.write(Buffer.concat(frames));
  }

  /**
   * The earliest received frame matching `filter` that no earlier nextFrame() call returned, waiting
   * for it if needed. Rejects on timeout, or when the connection closes without one.
   */
  nextFrame(filter?: FrameFilter, timeoutMs = DEFAULT_WAIT_MS): Promise<H2Frame> {
    return this.waitFor(
      () => {
        const found = this.frames.find((f) => !this.consumed.has(f) && matches(filter, f));
        if (found) {
          this.consumed.add(found);
          return found;
        }
        if (this.isClosed) throw new Error(`nextFrame: connection closed without a matching frame; received: ${this.describeFrames()}`);
        return undefined;
      },
      timeoutMs,
      () => {
        throw new Error(`nextFrame: no matching frame within ${timeoutMs} ms; received: ${this.describeFrames()}`);
      },
    );
  }

  /**
   * The server's answer on `streamId`: its first non-1xx HEADERS (decoded), or RST_STREAM, or a
   * GOAWAY that rules the answer out (error code, or lastStreamId below the stream), or
   * `{closed: true}`. Rejects on timeout or if the response header block fails to decode.
   */
  waitForResponse(streamId: number, timeoutMs = DEFAULT_WAIT_MS): Promise<H2Response> {
    return this.waitFor<H2Response>(
      () => {
        for (const f of this.frames) {
          if (f.streamId !== streamId) continue;
          if (f.type === FrameType.RST_STREAM) return { headers: {}, headerList: [], endStream: true, rst: rstCode(f) };
          if (f.type !== FrameType.HEADERS) continue;
          if (f.hpackError) throw new Error(`waitForResponse: header block on stream ${streamId} did not decode: ${f.hpackError}`);
          if (!f.headers) return undefined; // CONTINUATION still to come
          const statusText = f.headers.find(([name]) => name === ':status')?.[1];
          const status = statusText === undefined ? undefined : Number(statusText);
          if (status !== undefined && status >= 100 && status < 200) continue;
          return { ...(status !== undefined ? { status } : {}), headers: headerRecord(f.headers), headerList: f.headers, endStream: (f.flags & Flag.END_STREAM) !== 0 };
        }
        for (const f of this.frames) {
          if (f.type !== FrameType.GOAWAY) continue;
          const goaway = parseGoaway(f);
          if (goaway.code !== ErrorCode.NO_ERROR || goaway.lastStreamId < streamId) return { headers: {}, headerList: [], endStream: false, goaway };
        }
        if (this.isClosed) return { headers: {}, headerList: [], endStream: false, closed: true };
        return undefined;
      },
      timeoutMs,
      () => {
        throw new Error(`waitForResponse(${streamId}): nothing within ${timeoutMs} ms; received: ${this.describeFrames()}`);
      },
    );
  }

  /** True once a frame with END_STREAM arrives on the stream; false on RST_STREAM, close or timeout. */
  waitForEndStream(streamId: number, timeoutMs = DEFAULT_WAIT_MS): Promise<boolean> {
    return this.waitFor(
      () => {
        for (const f of this.frames) {
          if (f.streamId !== streamId) continue;
          if (f.type === FrameType.RST_STREAM) return false;
          if ((f.type === FrameType.DATA || f.type === FrameType.HEADERS) && f.flags & Flag.END_STREAM) return true;
        }
        return this.isClosed ? false : undefined;
      },
      timeoutMs,
      () => false,
    );
  }

  /** The first GOAWAY received, or null if the connection closed or the time ran out without one. */
  waitForGoaway(timeoutMs = DEFAULT_WAIT_MS): Promise<GoawayInfo | null> {
    return this.waitFor<GoawayInfo | null>(
      () => {
        const f = this.frames.find((x) => x.type === FrameType.GOAWAY);
        if (f) return parseGoaway(f);
        return this.isClosed ? null : undefined;
      },
      timeoutMs,
      () => null,
    );
  }

  /** True when the connection is (or becomes) closed within the time. */
  waitForClose(timeoutMs = DEFAULT_WAIT_MS): Promise<boolean> {
    return this.waitFor(() => (this.isClosed ? true : undefined), timeoutMs, () => false);
  }

  /** All DATA received on the stream so far, padding removed. */
  streamData(streamId: number): Buffer {
    return Buffer.concat(this.frames.filter((f) => f.type === FrameType.DATA && f.streamId === streamId).map(dataPayload));
  }

  /** All GOAWAYs received so far. */
  get goaways(): GoawayInfo[] {
    return this.frames.filter((f) => f.type === FrameType.GOAWAY).map(parseGoaway);
  }

  /** The received frames, one line each (the first 50), for assertion messages. */
  describeFrames(): string {
    if (this.frames.length === 0) return '(no frames)';
    const shown = this.frames.slice(0, 50).map(describeFrame).join('; ');
    return this.frames.length > 50 ? `${shown}; … ${this.frames.length - 50} more` : shown;
  }

  /** Graceful: TLS close_notify + FIN after pending writes. */
  end(): void {
    this.closingLocally = true;
    if (!this.socket.destroyed) this.socket.end();
  }

  /** Abrupt close (FIN without close_notify). */
  destroy(): void {
    this.closingLocally = true;
    this.socket.destroy();
    this.tcp.destroy();
  }

  /** Abortive close: TCP RST (SO_LINGER 0). */
  resetTcp(): void {
    this.closingLocally = true;
    try {
      if (!this.tcp.destroyed) this.tcp.resetAndDestroy();
    } catch (err) {
      this.captureError(err as Error);
      this.tcp.destroy();
    }
    this.socket.destroy();
  }

  private captureError(err: Error): void {
    const code = (err as NodeJS.ErrnoException).code;
    // Our own close cancels queued writes (Node 22+: ECANCELED "because of SSL destruction").
    if (this.closingLocally && (code === 'ECANCELED' || code === 'ERR_STREAM_DESTROYED' || code === 'EPIPE')) return;
    if (!this.errors.includes(err)) this.errors.push(err);
  }

  private markClosed(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.resolveClosed();
    this.notify();
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener();
  }

  /** Resolves with check()'s first non-undefined result (re-run on every frame and on close), else onTimeout() (never, if timeoutMs is Infinity); a throw rejects. */
  private waitFor<T>(check: () => T | undefined, timeoutMs: number, onTimeout: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const listener = (): void => {
        let result: T | undefined;
        try {
          result = check();
        } catch (err) {
          finish();
          reject(err as Error);
          return;
        }
        if (result === undefined) return;
        finish();
        resolve(result);
      };
      const finish = (): void => {
        this.listeners.delete(listener);
        if (timer) clearTimeout(timer);
      };
      this.listeners.add(listener);
      listener();
      if (!this.listeners.has(listener) || !Number.isFinite(timeoutMs)) return;
      timer = setTimeout(() => {
        finish();
        try {
          resolve(onTimeout());
        } catch (err) {
          reject(err as Error);
        }
      }, timeoutMs);
    });
  }

  private onData(chunk: Buffer): void {
    for (const f of this.parser.push(chunk)) this.onFrame(f);
  }

  private onFrame(f: H2Frame): void {
    this.frames.push(f);
    if (this.openBlock && !(f.type === FrameType.CONTINUATION && f.streamId === this.openBlock.frame.streamId)) {
      this.openBlock.frame.hpackError = `header block interrupted by ${describeFrame(f)}`;
      this.openBlock = undefined;
    }
    if (f.type === FrameType.HEADERS || f.type === FrameType.PUSH_PROMISE) {
      this.openBlock = { frame: f, chunks: [headerFragment(f)] };
      if (f.flags & Flag.END_HEADERS) this.closeBlock();
    } else if (f.type === FrameType.CONTINUATION && this.openBlock) {
      this.openBlock.chunks.push(headerFragment(f));
      if (f.flags & Flag.END_HEADERS) this.closeBlock();
    } else if (f.type === FrameType.SETTINGS && !(f.flags & Flag.ACK) && this.autoSettingsAck) {
      void this.write(settingsAck());
    } else if (f.type === FrameType.PING && !(f.flags & Flag.ACK) && this.autoPingAck) {
      void this.write(pingFrame(f.payload, true));
    } else if (f.type === FrameType.DATA && this.autoWindowUpdate && f.payload.length > 0) {
      const updates = [windowUpdateFrame(0, f.payload.length)];
      if (!(f.flags & Flag.END_STREAM)) updates.push(windowUpdateFrame(f.streamId, f.payload.length));
      void this.send(...updates);
    }
    this.notify();
  }

  private closeBlock(): void {
    const block = this.openBlock;
    this.openBlock = undefined;
    if (!block) return;
    try {
      block.frame.headers = this.hpack.decode(Buffer.concat(block.chunks));
    } catch (err) {
      block.frame.hpackError = (err as Error).message;
    }
  }
}

/**
 * Opens TCP + TLS (ALPN h2, any server certificate accepted, optional client certificate) and,
 * unless `sendPreface: false`, writes the client preface and a SETTINGS frame in one write.
 * Rejects only if TCP/TLS cannot be established.
 */
export function connectRaw(options: ConnectRawOptions): Promise<RawH2> {
  const host = options.host ?? '127.0.0.1';
  const servername = options.servername ?? (net.isIP(host) ? undefined : host);
  const tcp = net.connect({ host, port: options.port });
  const socket = tls.connect({
    ...options.tls,
    socket: tcp,
    ALPNProtocols: options.alpn ?? ['h2'],
    rejectUnauthorized: false,
    ...(servername !== undefined ? { servername } : {}),
    ...(options.cert !== undefined ? { cert: options.cert } : {}),
    ...(options.key !== undefined ? { key: options.key } : {}),
  });
  const conn = new RawH2(socket, tcp, options);
  const tableSize = options.settings?.filter(([id]) => id === Setting.HEADER_TABLE_SIZE).at(-1);
  if (tableSize) conn.hpack.maxSizeLimit = tableSize[1];
  return new Promise<RawH2>((resolve, reject) => {
    const fail = (err: Error): void => {
      clearTimeout(timer);
      conn.destroy();
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error(`connectRaw: no TLS handshake with ${host}:${options.port} within ${options.connectTimeoutMs ?? 5000} ms`)), options.connectTimeoutMs ?? 5000);
    const onEarlyError = (err: Error): void => fail(err);
    const onEarlyClose = (): void => fail(conn.error ?? new Error(`connectRaw: ${host}:${options.port} closed before the TLS handshake completed`));
    socket.once('error', onEarlyError);
    tcp.once('error', onEarlyError);
    socket.once('close', onEarlyClose);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      socket.off('error', onEarlyError);
      tcp.off('error', onEarlyError);
      socket.off('close', onEarlyClose);
      if (options.sendPreface ?? true) void conn.send(CLIENT_PREFACE, settingsFrame(options.settings ?? []));
      resolve(conn);
    });
  });
}
