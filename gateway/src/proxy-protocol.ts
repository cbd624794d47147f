/**
 * PROXY protocol version 2 (haproxy.org/download/2.9/doc/proxy-protocol.txt), the binary header a
 * layer-4 balancer puts before the client's first byte (DESIGN §9g). Only what a TCP balancer in
 * front of a TCP listener can honestly send is accepted; everything else is a refusal with a
 * reason (a metric label and a log field, never sent to the peer):
 * - version 2 only; the text form (v1, "PROXY TCP4 …") is refused;
 * - PROXY over TCP (AF_INET or AF_INET6, STREAM); LOCAL (the balancer speaking for itself, e.g. a
 *   health check) with any family, its address block (sent or not) ignored;
 * - the length field bounded by MAX_PROXY_V2_PAYLOAD, and large enough for the family's addresses;
 * - TLVs framed exactly (type, 16-bit length, value) to the end of the header; a CRC32C TLV, when
 *   present, must match; other TLV types are skipped, as the specification requires.
 * npm's proxy-protocol-js was read and not used: it never compares the length field with the
 * bytes present, does not frame TLVs, and leaves a stream's remaining bytes to the caller.
 */

export const PROXY_V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

/** Fixed part: signature, version/command, family/transport, 16-bit length. */
export const PROXY_V2_FIXED_BYTES = 16;

/**
 * Bytes after the fixed part. IPv6 addresses take 36; HAProxy's optional TLVs (ALPN, authority,
 * unique id, CRC, SSL summary) fit easily. The field itself allows 65,535: a peer claiming more
 * than this is refused before anything more is read.
 */
export const MAX_PROXY_V2_PAYLOAD = 1024;

export const MAX_PROXY_V2_HEADER_BYTES = PROXY_V2_FIXED_BYTES + MAX_PROXY_V2_PAYLOAD;

/** Why a header was refused (metric label `reason` of agent_gateway_proxy_protocol_refusals_total). */
export type ProxyRefusal =
  /** A trusted balancer's connection did not start with the v2 signature. */
  | 'missing'
  /** The text form, version 1. */
  | 'v1'
  /** A header from an address not in `[server] proxy_protocol_from`. */
  | 'untrusted_source'
  | 'bad_version'
  | 'bad_command'
  /** PROXY with UNSPEC, UNIX or DGRAM: not a TCP client of ours. */
  | 'bad_family'
  /** Length field over MAX_PROXY_V2_PAYLOAD, or too short for the family's addresses. */
  | 'bad_length'
  | 'bad_tlv'
  | 'bad_checksum'
  /** The peer closed or stalled before a whole header arrived. */
  | 'truncated'
  | 'timeout';

export class ProxyHeaderError extends Error {
  readonly reason: ProxyRefusal;
  constructor(reason: ProxyRefusal, message: string) {
    super(message);
    this.name = 'ProxyHeaderError';
    this.reason = reason;
  }
}

export interface ProxyEndpoint {
  readonly address: string;
  readonly port: number;
}

export type ProxyHeader =
  | { readonly command: 'local' }
  | { readonly command: 'proxy'; readonly family: 'inet' | 'inet6'; readonly source: ProxyEndpoint; readonly destination: ProxyEndpoint };

export type ParseResult =
  /** More bytes are needed; nothing is wrong so far. */
  | { readonly done: false }
  /** `length` bytes of the buffer were the header; the rest belong to the client. */
  | { readonly done: true; readonly header: ProxyHeader; readonly length: number };

const FAMILY_INET = 0x1;
const FAMILY_INET6 = 0x2;
const TRANSPORT_STREAM = 0x1;
const ADDRESS_BYTES: Record<number, number> = { [FAMILY_INET]: 12, [FAMILY_INET6]: 36 };
const TLV_CRC32C = 0x03;

/** True when `bytes` could still be the start of a v2 header (a prefix of the signature, or more). */
export function startsLikeProxyV2(bytes: Uint8Array): boolean {
  const n = Math.min(bytes.length, PROXY_V2_SIGNATURE.length);
  for (let i = 0; i < n; i++) if (bytes[i] !== PROXY_V2_SIGNATURE[i]) return false;
  return true;
}

const V1_PREFIX = Buffer.from('PROXY ', 'latin1');

/** True when `bytes` begin like the text form (or a prefix of it). */
export function startsLikeProxyV1(bytes: Uint8Array): boolean {
  const n = Math.min(bytes.length, V1_PREFIX.length);
  if (n === 0) return false;
  for (let i = 0; i < n; i++) if (bytes[i] !== V1_PREFIX[i]) return false;
  return true;
}

/**
 * Parses the header at the start of `bytes` (what has arrived so far). Returns `{ done: false }`
 * while a valid header may still be arriving; throws ProxyHeaderError as soon as the bytes cannot
 * be one. Never reads past the length the header declares.
 */
export function parseProxyV2(bytes: Buffer): ParseResult {
  if (!startsLikeProxyV2(bytes)) {
    if (startsLikeProxyV1(bytes)) throw new ProxyHeaderError('v1', 'PROXY protocol version 1 is not accepted');
    throw new ProxyHeaderError('missing', 'the connection does not start with a PROXY protocol v2 header');
  }
  if (bytes.length < PROXY_V2_FIXED_BYTES) {
    // Refuse early what the first bytes already rule out.
    if (bytes.length > 12) checkVersionCommand(bytes[12]!);
    return { done: false };
  }
  const command = checkVersionCommand(bytes[12]!);
  const family = bytes[13]! >> 4;
  const transport = bytes[13]! & 0x0f;
  const payload = bytes.readUInt16BE(14);
  if (payload > MAX_PROXY_V2_PAYLOAD) throw new ProxyHeaderError('bad_length', `header length ${payload} exceeds ${MAX_PROXY_V2_PAYLOAD}`);
  const addressBytes = ADDRESS_BYTES[family];
  if (command === 'proxy' && (addressBytes === undefined || transport !== TRANSPORT_STREAM)) {
    throw new ProxyHeaderError('bad_family', `PROXY command with family ${family} and transport ${transport}: only TCP over IPv4 or IPv6 is accepted`);
  }
  // LOCAL carries whatever block its family implies (usually none); only its framing is checked.
  // Its family is "ignored" (proxy-protocol.txt 2.2: the receiver must accept a LOCAL connection),
  // so a LOCAL naming a family without sending its addresses is framed as if it named none.
  let block = addressBytes !== undefined && transport !== 0 ? addressBytes : 0;
  if (command === 'local' && payload < block) block = 0;
  if (payload < block) throw new ProxyHeaderError('bad_length', `header length ${payload} is too short for its ${block}-byte address block`);
  const length = PROXY_V2_FIXED_BYTES + payload;
  if (bytes.length < length) return { done: false };
  const header = bytes.subarray(0, length);
  if (command === 'local') {
    // A LOCAL naming a family may or may not send its addresses, and with 12 bytes or more of
    // TLVs the length cannot tell which: either framing that holds is accepted.
    try {
      checkTlvs(header, PROXY_V2_FIXED_BYTES + block);
    } catch (error) {
      if (block === 0) throw error;
      checkTlvs(header, PROXY_V2_FIXED_BYTES);
    }
    return { done: true, header: { command: 'local' }, length };
  }
  checkTlvs(header, PROXY_V2_FIXED_BYTES + block);
  const at = PROXY_V2_FIXED_BYTES;
  const inet = family === FAMILY_INET;
  const size = inet ? 4 : 16;
  const source = formatAddress(header.subarray(at, at + size));
  const destination = formatAddress(header.subarray(at + size, at + 2 * size));
  const ports = at + 2 * size;
  return {
    done: true,
    header: {
      command: 'proxy',
      family: inet ? 'inet' : 'inet6',
      source: { address: source, port: header.readUInt16BE(ports) },
      destination: { address: destination, port: header.readUInt16BE(ports + 2) },
    },
    length,
  };
}

function checkVersionCommand(byte: number): 'local' | 'proxy' {
  if (byte >> 4 !== 0x2) throw new ProxyHeaderError('bad_version', `PROXY protocol version ${byte >> 4} is not accepted (only 2)`);
  const command = byte & 0x0f;
  if (command === 0x0) return 'local';
  if (command === 0x1) return 'proxy';
  throw new ProxyHeaderError('bad_command', `unknown PROXY protocol command ${command}`);
}

function checkTlvs(header: Buffer, start: number): void {
  let at = start;
  while (at < header.length) {
    if (header.length - at < 3) throw new ProxyHeaderError('bad_tlv', `${header.length - at} stray bytes after the last TLV`);
    const type = header[at]!;
    const length = header.readUInt16BE(at + 1);
    const end = at + 3 + length;
    if (end > header.length) throw new ProxyHeaderError('bad_tlv', `TLV type 0x${type.toString(16)} of ${length} bytes overruns the header`);
    if (type === TLV_CRC32C) {
      if (length !== 4) throw new ProxyHeaderError('bad_tlv', `CRC32C TLV of ${length} bytes, not 4`);
      const expected = header.readUInt32BE(at + 3);
      const zeroed = Buffer.from(header);
      zeroed.fill(0, at + 3, end);
      if (crc32c(zeroed) !== expected) throw new ProxyHeaderError('bad_checksum', 'CRC32C TLV does not match the header');
    }
    at = end;
  }
}

function formatAddress(bytes: Buffer): string {
  if (bytes.length === 4) return `${bytes[0]}.${bytes[1]}.${bytes[2]}.${bytes[3]}`;
  // IPv4-mapped in the mixed form (RFC 5952 section 5), as Node reports a direct peer on a dual-stack
  // listener: the same agent must read the same in logs and audit rows whichever way it came.
  if (bytes.subarray(0, 10).every((byte) => byte === 0) && bytes[10] === 0xff && bytes[11] === 0xff) return `::ffff:${formatAddress(bytes.subarray(12))}`;
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i).toString(16));
  // RFC 5952: the longest run (2+) of zero groups becomes "::".
  let best = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLength) [best, bestLength] = [i, j - i];
    i = j;
  }
  if (best < 0) return groups.join(':');
  return `${groups.slice(0, best).join(':')}::${groups.slice(best + bestLength).join(':')}`;
}

let crcTable: Uint32Array | undefined;

/** CRC-32C (Castagnoli), as the CRC32C TLV uses. */
export function crc32c(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (const byte of bytes) crc = crcTable[(crc ^ byte) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** Encodes a header (tests, bench): the form HAProxy's send-proxy-v2 sends, plus optional TLVs. */
export function encodeProxyV2(header: ProxyHeader, tlvs: readonly { type: number; value: Uint8Array }[] = []): Buffer {
  const tlvBytes = Buffer.concat(tlvs.map(({ type, value }) => Buffer.concat([Buffer.from([type, value.length >> 8, value.length & 0xff]), value])));
  if (header.command === 'local') {
    const fixed = Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x20, 0x00, tlvBytes.length >> 8, tlvBytes.length & 0xff])]);
    return Buffer.concat([fixed, tlvBytes]);
  }
  const inet = header.family === 'inet';
  const addresses = Buffer.concat([addressBytes(header.source.address, inet), addressBytes(header.destination.address, inet), Buffer.alloc(4)]);
  addresses.writeUInt16BE(header.source.port, addresses.length - 4);
  addresses.writeUInt16BE(header.destination.port, addresses.length - 2);
  const payload = addresses.length + tlvBytes.length;
  const fixed = Buffer.concat([PROXY_V2_SIGNATURE, Buffer.from([0x21, ((inet ? FAMILY_INET : FAMILY_INET6) << 4) | TRANSPORT_STREAM, payload >> 8, payload & 0xff])]);
  return Buffer.concat([fixed, addresses, tlvBytes]);
}

function addressBytes(text: string, inet: boolean): Buffer {
  if (inet) return Buffer.from(text.split('.').map(Number));
  const [head = '', tail] = text.split('::');
  const parse = (part: string) => (part === '' ? [] : part.split(':').map((group) => parseInt(group, 16)));
  const left = parse(head);
  const right = tail === undefined ? [] : parse(tail);
  const groups = [...left, ...Array<number>(8 - left.length - right.length).fill(0), ...right];
  const out = Buffer.alloc(16);
  groups.forEach((group, i) => out.writeUInt16BE(group, i * 2));
  return out;
}
