import ipaddr from 'ipaddr.js';
import { InvalidDestinationError } from './errors.js';

/**
 * A destination in the one form the registry stores and matches: `host:port`,
 * host lowercased, IPv6 bracketed in RFC 5952 form, port always present.
 */
export interface Destination {
  /** Host as dialled: a lowercase hostname, a dotted-quad IPv4 address, or an IPv6 address without brackets. */
  readonly host: string;
  readonly port: number;
  readonly kind: 'hostname' | 'ipv4' | 'ipv6';
  /** The normalised `host:port` text (IPv6 bracketed), as stored in the registry. */
  readonly authority: string;
}

export const DEFAULT_PORT = 443;
const MAX_AUTHORITY_LENGTH = 512;
const MAX_HOST_LENGTH = 253;
const MAX_LABEL_LENGTH = 63;
const LDH_LABEL = /^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$/;
const DECIMAL_OCTET = /^(?:0|[1-9][0-9]{0,2})$/;
const PORT = /^[1-9][0-9]{0,4}$/;
// Anything that could smuggle a second meaning past the parser: userinfo, path, query,
// fragment, percent-encoding, whitespace, control characters, or a non-ASCII byte.
const FORBIDDEN = /[@/?#%\\\s\u0000-\u001f\u007f-\uffff]/;

function fail(authority: string, why: string): never {
  const shown = authority.length > 80 ? `${authority.slice(0, 80)}…` : authority;
  throw new InvalidDestinationError(`invalid destination ${JSON.stringify(shown)}: ${why}`);
}

function parsePort(authority: string, text: string | undefined): number {
  if (text === undefined) return DEFAULT_PORT;
  if (!PORT.test(text)) fail(authority, 'port must be decimal digits 1-65535 without a leading zero');
  const port = Number(text);
  if (port > 65535) fail(authority, 'port must be 1-65535');
  return port;
}

function isIPv4DottedQuad(host: string): boolean {
  const parts = host.split('.');
  return parts.length === 4 && parts.every((p) => DECIMAL_OCTET.test(p) && Number(p) <= 255);
}

function normaliseIPv6(authority: string, literal: string): string {
  // Dotted embedded-IPv4 notation is only meaningful for the IPv4-mapped and IPv4-compatible
  // ranges, which are refused below; refusing the notation outright keeps one spelling per address.
  if (literal.includes('.')) fail(authority, 'IPv6 addresses that embed IPv4 are not allowed');
  if (!ipaddr.IPv6.isValid(literal)) fail(authority, 'not a valid IPv6 address');
  const address = ipaddr.IPv6.parse(literal);
  const words = address.parts;
  const upperZero = words.slice(0, 5).every((w) => w === 0);
  if (upperZero && words[5] === 0xffff) fail(authority, 'IPv4-mapped IPv6 addresses are not allowed');
  if (upperZero && words[5] === 0) {
    const low = ((words[6] ?? 0) << 16) | (words[7] ?? 0);
    if (low !== 0 && low !== 1) fail(authority, 'IPv4-compatible IPv6 addresses are not allowed');
  }
  return address.toRFC5952String();
}

function normaliseHostname(authority: string, rawHost: string): Pick<Destination, 'host' | 'kind'> {
  const host = rawHost.toLowerCase();
  if (host.length === 0) fail(authority, 'host is empty');
  if (host.length > MAX_HOST_LENGTH) fail(authority, `host is longer than ${MAX_HOST_LENGTH} bytes`);
  if (host.endsWith('.')) fail(authority, 'host must not end with a dot');
  const labels = host.split('.');
  const last = labels[labels.length - 1] ?? '';
  // WHATWG URL parsers read such hosts as IPv4 numbers (127.1, 0x7f.1): accept only the unambiguous form.
  if (/^[0-9]+$/.test(last) || last.startsWith('0x')) {
    if (!isIPv4DottedQuad(host)) fail(authority, 'numeric host must be a dotted-quad IPv4 address without leading zeros');
    return { host, kind: 'ipv4' };
  }
  for (const label of labels) {
    if (label.length === 0) fail(authority, 'host has an empty label');
    if (label.length > MAX_LABEL_LENGTH) fail(authority, `host label longer than ${MAX_LABEL_LENGTH} bytes`);
    if (!LDH_LABEL.test(label)) fail(authority, 'host labels must be letters, digits and inner hyphens');
  }
  return { host, kind: 'hostname' };
}

/**
 * Normalises a CONNECT authority or a destination argument to `host:port`.
 * The gateway and the registry CLI both call this, so stored rows and requests match byte for byte.
 * Throws InvalidDestinationError for anything it does not accept.
 */
export function normaliseDestination(authority: string): Destination {
  if (typeof authority !== 'string' || authority.length === 0) fail(String(authority ?? ''), 'authority is empty');
  if (authority.length > MAX_AUTHORITY_LENGTH) fail(authority, 'authority is too long');
  if (FORBIDDEN.test(authority)) {
    fail(authority, 'only host[:port] is allowed (no userinfo, path, query, fragment, percent-encoding, whitespace or non-ASCII)');
  }

  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) fail(authority, 'unterminated IPv6 literal');
    const rest = authority.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) fail(authority, 'unexpected text after IPv6 literal');
    const port = parsePort(authority, rest === '' ? undefined : rest.slice(1));
    const host = normaliseIPv6(authority, authority.slice(1, close));
    return Object.freeze({ host, port, kind: 'ipv6', authority: `[${host}]:${port}` });
  }

  const colons = authority.split(':').length - 1;
  if (colons > 1) fail(authority, 'IPv6 addresses must be in brackets');
  if (authority.includes('[') || authority.includes(']')) fail(authority, 'brackets are only allowed around IPv6 addresses');
  const [rawHost = '', rawPort] = colons === 1 ? authority.split(':') : [authority, undefined];
  const port = parsePort(authority, rawPort);
  const { host, kind } = normaliseHostname(authority, rawHost);
  return Object.freeze({ host, port, kind, authority: `${host}:${port}` });
}

/** The normalised `host:port` text of a destination; throws InvalidDestinationError. */
export function normaliseAuthority(authority: string): string {
  return normaliseDestination(authority).authority;
}
