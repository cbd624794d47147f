/**
 * Reads the server_name of a TLS ClientHello from the first bytes a client sends through a
 * tunnel (DESIGN §9c), without decrypting anything: the ClientHello is in the clear. Small and
 * strict; pure; never throws (every outcome is a value), fuzzed in test/unit/client-hello.test.ts.
 *
 * The ClientHello may span several TLS records and arrive in any number of segments; at most
 * MAX_CLIENT_HELLO_BYTES are ever looked at.
 */

/** One record of up to 2^14 bytes plus its header: the most the gateway holds back. */
export const MAX_CLIENT_HELLO_BYTES = 16 * 1024 + 5;

export type ClientHelloResult =
  /** Not enough bytes yet. */
  | { readonly kind: 'incomplete' }
  /** The first bytes are neither a TLS record nor an SSLv2 ClientHello (another protocol). */
  | { readonly kind: 'not_tls' }
  /** A TLS handshake that is not a well-formed ClientHello, or too large. */
  | { readonly kind: 'invalid'; readonly why: string }
  /** A complete ClientHello; `serverName` is its host_name, lowercased, if it has one. */
  | { readonly kind: 'client_hello'; readonly serverName: string | undefined };

const HANDSHAKE = 0x16;
const ALERT = 0x15;
/** TLS record content types: change_cipher_spec (20) to heartbeat (24). */
const FIRST_RECORD_TYPE = 0x14;
const LAST_RECORD_TYPE = 0x18;
/** SSLv2's CLIENT-HELLO message type, after a 2-byte header whose top bit is set. */
const SSL2_CLIENT_HELLO = 0x01;
const CLIENT_HELLO = 0x01;
const SERVER_NAME = 0x0000;
const HOST_NAME = 0x00;

const INCOMPLETE: ClientHelloResult = Object.freeze({ kind: 'incomplete' });
const SSL2_HELLO: ClientHelloResult = Object.freeze({ kind: 'client_hello', serverName: undefined });
const NOT_TLS: ClientHelloResult = Object.freeze({ kind: 'not_tls' });
const invalid = (why: string): ClientHelloResult => ({ kind: 'invalid', why });

/** Reassembles the handshake bytes carried by the leading handshake records of `data`. */
function handshakeBytes(data: Uint8Array): { bytes: Uint8Array; complete: boolean } | ClientHelloResult {
  const parts: Uint8Array[] = [];
  let total = 0;
  let at = 0;
  let needed = -1; // handshake message length + 4, once its header is known
  while (true) {
    if (needed >= 0 && total >= needed) break;
    if (at + 5 > data.length) return INCOMPLETE;
    // The record version is not checked: servers take any on the records before the ClientHello
    // is read (OpenSSL any 3.x, Go anything below 16.0).
    if (data[at] !== HANDSHAKE) return invalid(at === 0 ? 'the first record is not a handshake record' : 'a non-handshake record inside the ClientHello');
    const length = (data[at + 3]! << 8) | data[at + 4]!;
    if (length === 0 || length > 16 * 1024) return invalid(`record length ${length}`);
    if (at + 5 + length > data.length) return INCOMPLETE;
    parts.push(data.subarray(at + 5, at + 5 + length));
    total += length;
    at += 5 + length;
    if (needed < 0 && total >= 4) {
      const first = parts.length === 1 ? parts[0]! : concat(parts, total);
      if (first[0] !== CLIENT_HELLO) return invalid('the first handshake message is not a ClientHello');
      needed = 4 + ((first[1]! << 16) | (first[2]! << 8) | first[3]!);
      if (needed > MAX_CLIENT_HELLO_BYTES) return invalid(`ClientHello of ${needed} bytes`);
    }
  }
  return { bytes: concat(parts, total).subarray(0, needed), complete: true };
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  if (parts.length === 1) return parts[0]!;
  const out = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/**
 * An SSLv2-format CLIENT-HELLO as OpenSSL reads one (the only server that still does): top bit of
 * the 2-byte header set, message type 1, a 3.x version, and cipher-spec, session-id and
 * challenge lengths that add up to the record's (OpenSSL refuses anything else with
 * protocol_version or decode_error). The rest (an unframed Thrift compact call, 82 21 01 ...)
 * is another protocol.
 */
function ssl2ClientHello(data: Uint8Array): ClientHelloResult {
  if (data.length < 3) return INCOMPLETE;
  if (data[2] !== SSL2_CLIENT_HELLO) return NOT_TLS;
  if (data.length < 4) return INCOMPLETE;
  if (data[3] !== 0x03) return NOT_TLS;
  if (data.length < 11) return INCOMPLETE;
  const length = ((data[0]! & 0x7f) << 8) | data[1]!;
  const u16 = (at: number) => (data[at]! << 8) | data[at + 1]!;
  return 9 + u16(5) + u16(7) + u16(9) === length ? SSL2_HELLO : NOT_TLS;
}

/** Parses the first bytes of a tunnel. */
export function parseClientHello(data: Uint8Array): ClientHelloResult {
  if (data.length === 0) return INCOMPLETE;
  const first = data[0]!;
  // OpenSSL servers still take SSLv2's CLIENT-HELLO, which has no extensions: a ClientHello
  // without a server_name, not another protocol that `match` would let through.
  if (first & 0x80) return ssl2ClientHello(data);
  if (first < FIRST_RECORD_TYPE || first > LAST_RECORD_TYPE) return NOT_TLS;
  if (data.length < 2) return INCOMPLETE;
  // A TLS record of any type and version a server would read (OpenSSL reads major version 3, Go
  // anything below 16.0). Such a record in front of the ClientHello, a warning alert (Go skips
  // it) or an empty change_cipher_spec (OpenSSL skips it), or an unusual record version, is
  // still TLS: passing it as another protocol would let the ClientHello behind it name any host.
  if (data[1]! >= 0x10) return NOT_TLS;
  // Below 3.x only Go reads a first record (OpenSSL, BoringSSL and rustls refuse it), and only a
  // 2-byte alert or a non-empty handshake record whose first byte starts a ClientHello. Anything
  // else is another protocol that merely starts alike (a MySQL handshake response or a MongoDB
  // message of 276 to 280 bytes): refusing it broke that protocol under `match` and kept nothing out.
  if (data[1] !== 0x03) {
    if (first !== HANDSHAKE && first !== ALERT) return NOT_TLS;
    if (data.length < 5) return INCOMPLETE;
    const length = (data[3]! << 8) | data[4]!;
    if (first === ALERT) {
      if (length !== 2) return NOT_TLS;
    } else {
      if (length === 0) return NOT_TLS;
      if (data.length < 6) return INCOMPLETE;
      if (data[5] !== CLIENT_HELLO) return NOT_TLS;
    }
  }
  const reassembled = handshakeBytes(data.length > MAX_CLIENT_HELLO_BYTES * 2 ? data.subarray(0, MAX_CLIENT_HELLO_BYTES * 2) : data);
  if ('kind' in reassembled) return reassembled;
  const hello = reassembled.bytes;
  // msg_type(1) length(3) legacy_version(2) random(32)
  let at = 4 + 2 + 32;
  if (hello.length < at + 1) return invalid('truncated ClientHello');
  const sessionIdLength = hello[at]!;
  if (sessionIdLength > 32) return invalid('session id longer than 32 bytes');
  at += 1 + sessionIdLength;
  if (at + 2 > hello.length) return invalid('truncated ClientHello');
  const suitesLength = (hello[at]! << 8) | hello[at + 1]!;
  if (suitesLength < 2 || suitesLength % 2 !== 0) return invalid('malformed cipher suites');
  at += 2 + suitesLength;
  if (at + 1 > hello.length) return invalid('truncated ClientHello');
  const compressionLength = hello[at]!;
  if (compressionLength < 1) return invalid('no compression methods');
  at += 1 + compressionLength;
  if (at > hello.length) return invalid('truncated ClientHello');
  if (at === hello.length) return { kind: 'client_hello', serverName: undefined }; // no extensions
  if (at + 2 > hello.length) return invalid('truncated extensions');
  const extensionsEnd = at + 2 + ((hello[at]! << 8) | hello[at + 1]!);
  if (extensionsEnd !== hello.length) return invalid('extensions do not fill the ClientHello');
  at += 2;
  let serverName: string | undefined;
  let seenServerName = false;
  while (at < extensionsEnd) {
    if (at + 4 > extensionsEnd) return invalid('truncated extension');
    const type = (hello[at]! << 8) | hello[at + 1]!;
    const length = (hello[at + 2]! << 8) | hello[at + 3]!;
    const start = at + 4;
    const end = start + length;
    if (end > extensionsEnd) return invalid('extension overruns the ClientHello');
    if (type === SERVER_NAME) {
      if (seenServerName) return invalid('server_name twice');
      seenServerName = true;
      const parsed = readServerName(hello.subarray(start, end));
      if (typeof parsed !== 'string' && parsed !== undefined) return parsed;
      serverName = parsed;
    }
    at = end;
  }
  return { kind: 'client_hello', serverName };
}

/** The host_name of a server_name extension (RFC 6066 §3): exactly one, ASCII, no NUL. */
function readServerName(ext: Uint8Array): string | undefined | ClientHelloResult {
  if (ext.length < 2) return invalid('empty server_name');
  const listEnd = 2 + ((ext[0]! << 8) | ext[1]!);
  if (listEnd !== ext.length) return invalid('server_name list length');
  let at = 2;
  let name: string | undefined;
  while (at < listEnd) {
    if (at + 3 > listEnd) return invalid('truncated server_name entry');
    const type = ext[at]!;
    const length = (ext[at + 1]! << 8) | ext[at + 2]!;
    const end = at + 3 + length;
    if (end > listEnd || length === 0) return invalid('server_name entry length');
    if (type === HOST_NAME) {
      if (name !== undefined) return invalid('two host_names');
      let text = '';
      for (let i = at + 3; i < end; i++) {
        const c = ext[i]!;
        if (c <= 0x20 || c >= 0x7f) return invalid('host_name is not printable ASCII');
        text += String.fromCharCode(c);
      }
      name = text.toLowerCase();
    }
    at = end;
  }
  return name;
}

export type SniMode = 'match' | 'require' | 'off';

export type SniVerdict = { readonly kind: 'wait' } | { readonly kind: 'pass' } | { readonly kind: 'refuse'; readonly why: string };

const WAIT: SniVerdict = Object.freeze({ kind: 'wait' });
const PASS: SniVerdict = Object.freeze({ kind: 'pass' });

/**
 * What to do with a tunnel's first client bytes (DESIGN §9c). `host` is the CONNECT host as
 * normalised (lowercase; IPv6 without brackets), `hostIsIp` for IP-literal destinations.
 * - match: a ClientHello's server_name must equal the host; an IP-literal destination needs
 *   none (a present one must equal it); bytes that are not TLS pass.
 * - require: the first bytes must be a ClientHello with a matching server_name.
 * `ended`: the client sent everything it will (no more bytes can complete a ClientHello).
 */
export function sniVerdict(data: Uint8Array, mode: SniMode, host: string, hostIsIp: boolean, ended: boolean): SniVerdict {
  if (mode === 'off') return PASS;
  const hello = parseClientHello(data);
  switch (hello.kind) {
    case 'incomplete':
      // DESIGN §9c: at most 16 KiB + 5 bytes are held waiting for a ClientHello to complete.
      if (!ended) return data.length >= MAX_CLIENT_HELLO_BYTES ? { kind: 'refuse', why: `no complete ClientHello in ${MAX_CLIENT_HELLO_BYTES} bytes` } : WAIT;
      return data.length === 0 && mode === 'match' ? PASS : { kind: 'refuse', why: 'the client ended before a complete ClientHello' };
    case 'not_tls':
      return mode === 'require' ? { kind: 'refuse', why: 'the first bytes are not a TLS ClientHello' } : PASS;
    case 'invalid':
      return { kind: 'refuse', why: `malformed ClientHello: ${hello.why}` };
    case 'client_hello':
      if (hello.serverName === undefined) return hostIsIp ? PASS : { kind: 'refuse', why: `no server_name for ${host}` };
      return hello.serverName === host ? PASS : { kind: 'refuse', why: `server_name ${hello.serverName} is not ${host}` };
  }
}
