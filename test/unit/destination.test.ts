import { test } from 'node:test';
import assert from 'node:assert/strict';
import { normaliseAuthority, normaliseDestination, DEFAULT_PORT } from '../../registry/destination.js';
import type { Destination } from '../../registry/destination.js';
import { InvalidDestinationError } from '../../registry/errors.js';

// DESIGN §3 "Destination normalisation": one function, used by gateway and CLI.

const label = (length: number, char = 'a'): string => char.repeat(length);
/** Test names show anything outside printable ASCII as \uXXXX. */
const show = (text: string): string =>
  JSON.stringify(text.length > 60 ? `${text.slice(0, 20)}...(${text.length})` : text).replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
/** A hostname of exactly `length` bytes made of 63-byte labels and one shorter last label. */
function hostOfLength(length: number): string {
  const labels: string[] = [];
  let remaining = length;
  while (remaining > 64) {
    labels.push(label(63, String.fromCharCode(0x61 + labels.length)));
    remaining -= 64; // label plus the dot after it
  }
  labels.push(label(remaining, 'z'));
  const host = labels.join('.');
  assert.equal(host.length, length);
  return host;
}

interface ValidCase {
  readonly input: string;
  readonly expected: string;
  readonly host: string;
  readonly port: number;
  readonly kind: Destination['kind'];
  readonly why: string;
}

const valid: readonly ValidCase[] = [
  // hostnames
  { input: 'api.example.com:443', expected: 'api.example.com:443', host: 'api.example.com', port: 443, kind: 'hostname', why: 'already normalised' },
  { input: 'api.example.com', expected: 'api.example.com:443', host: 'api.example.com', port: 443, kind: 'hostname', why: 'port defaults to 443' },
  { input: 'docstore', expected: 'docstore:443', host: 'docstore', port: 443, kind: 'hostname', why: 'single-label host (the demo delegation)' },
  { input: 'API.Example.COM', expected: 'api.example.com:443', host: 'api.example.com', port: 443, kind: 'hostname', why: 'host is lowercased' },
  { input: 'Messaging:8443', expected: 'messaging:8443', host: 'messaging', port: 8443, kind: 'hostname', why: 'lowercased with explicit port' },
  { input: 'example.com:1', expected: 'example.com:1', host: 'example.com', port: 1, kind: 'hostname', why: 'lowest port' },
  { input: 'example.com:65535', expected: 'example.com:65535', host: 'example.com', port: 65535, kind: 'hostname', why: 'highest port' },
  { input: 'example.com:80', expected: 'example.com:80', host: 'example.com', port: 80, kind: 'hostname', why: 'two-digit port' },
  { input: 'example.com:10000', expected: 'example.com:10000', host: 'example.com', port: 10000, kind: 'hostname', why: 'port with inner zeros' },
  { input: 'a', expected: 'a:443', host: 'a', port: 443, kind: 'hostname', why: 'one-byte label' },
  { input: 'a-b.c-d--e.example', expected: 'a-b.c-d--e.example:443', host: 'a-b.c-d--e.example', port: 443, kind: 'hostname', why: 'inner hyphens' },
  { input: 'xn--bcher-kva.example', expected: 'xn--bcher-kva.example:443', host: 'xn--bcher-kva.example', port: 443, kind: 'hostname', why: 'punycode (A-label) is LDH' },
  { input: '123.example.com', expected: '123.example.com:443', host: '123.example.com', port: 443, kind: 'hostname', why: 'numeric label that is not the last one' },
  { input: '3com.example', expected: '3com.example:443', host: '3com.example', port: 443, kind: 'hostname', why: 'label starting with a digit' },
  { input: 'example.c0m', expected: 'example.c0m:443', host: 'example.c0m', port: 443, kind: 'hostname', why: 'last label mixes letters and digits' },
  { input: `${label(63)}.example`, expected: `${label(63)}.example:443`, host: `${label(63)}.example`, port: 443, kind: 'hostname', why: '63-byte label' },
  { input: hostOfLength(253), expected: `${hostOfLength(253)}:443`, host: hostOfLength(253), port: 443, kind: 'hostname', why: '253-byte host' },
  { input: `${hostOfLength(253).toUpperCase()}:8443`, expected: `${hostOfLength(253)}:8443`, host: hostOfLength(253), port: 8443, kind: 'hostname', why: '253-byte host, uppercase, with port' },
  // IPv4
  { input: '1.2.3.4', expected: '1.2.3.4:443', host: '1.2.3.4', port: 443, kind: 'ipv4', why: 'IPv4 defaults to 443' },
  { input: '127.0.0.1:8080', expected: '127.0.0.1:8080', host: '127.0.0.1', port: 8080, kind: 'ipv4', why: 'IPv4 with port' },
  { input: '0.0.0.0', expected: '0.0.0.0:443', host: '0.0.0.0', port: 443, kind: 'ipv4', why: 'single zeros are not leading zeros' },
  { input: '255.255.255.255:1', expected: '255.255.255.255:1', host: '255.255.255.255', port: 1, kind: 'ipv4', why: 'largest octets' },
  { input: '10.100.200.0', expected: '10.100.200.0:443', host: '10.100.200.0', port: 443, kind: 'ipv4', why: 'octets with inner and trailing zeros' },
  // IPv6, rewritten to RFC 5952
  { input: '[0:0::1]', expected: '[::1]:443', host: '::1', port: 443, kind: 'ipv6', why: 'DESIGN example: zeros compressed, port defaults' },
  { input: '[2001:DB8:0:0:0:0:0:1]:8443', expected: '[2001:db8::1]:8443', host: '2001:db8::1', port: 8443, kind: 'ipv6', why: 'lowercase hex, longest zero run compressed' },
  { input: '[::1]:443', expected: '[::1]:443', host: '::1', port: 443, kind: 'ipv6', why: 'loopback is allowed (not IPv4-compatible)' },
  { input: '[::]', expected: '[::]:443', host: '::', port: 443, kind: 'ipv6', why: 'unspecified address is allowed (not IPv4-compatible)' },
  { input: '[0:0:0:0:0:0:0:0]:80', expected: '[::]:80', host: '::', port: 80, kind: 'ipv6', why: 'all zeros compress to ::' },
  { input: '[::0:1]', expected: '[::1]:443', host: '::1', port: 443, kind: 'ipv6', why: 'redundant zero group after ::' },
  { input: '[2001:0db8:0000:0000:0000:ff00:0042:8329]', expected: '[2001:db8::ff00:42:8329]:443', host: '2001:db8::ff00:42:8329', port: 443, kind: 'ipv6', why: 'leading zeros in groups dropped (RFC 5952 4.1)' },
  { input: '[2001:db8:0:1:1:1:1:1]', expected: '[2001:db8:0:1:1:1:1:1]:443', host: '2001:db8:0:1:1:1:1:1', port: 443, kind: 'ipv6', why: 'a single zero group is not compressed (RFC 5952 4.2.2)' },
  { input: '[1:0:0:2:0:0:0:3]', expected: '[1:0:0:2::3]:443', host: '1:0:0:2::3', port: 443, kind: 'ipv6', why: 'longest zero run compressed (RFC 5952 4.2.3)' },
  { input: '[2001:db8:0:0:1:0:0:1]', expected: '[2001:db8::1:0:0:1]:443', host: '2001:db8::1:0:0:1', port: 443, kind: 'ipv6', why: 'first of equal zero runs compressed (RFC 5952 4.2.3)' },
  { input: '[1:2:3:4:5:6:7::]', expected: '[1:2:3:4:5:6:7:0]:443', host: '1:2:3:4:5:6:7:0', port: 443, kind: 'ipv6', why: ':: standing for one group is expanded' },
  { input: '[ABCD:EF01::]:65535', expected: '[abcd:ef01::]:65535', host: 'abcd:ef01::', port: 65535, kind: 'ipv6', why: 'uppercase hex lowercased' },
  { input: '[fe80::1]', expected: '[fe80::1]:443', host: 'fe80::1', port: 443, kind: 'ipv6', why: 'link-local without a zone id' },
  { input: '[0:0:0:0:1:ffff:0:0]', expected: '[::1:ffff:0:0]:443', host: '::1:ffff:0:0', port: 443, kind: 'ipv6', why: 'outside ::ffff:0:0/96' },
  { input: '[::1:0:0:0]', expected: '[::1:0:0:0]:443', host: '::1:0:0:0', port: 443, kind: 'ipv6', why: 'outside ::/96' },
  { input: '[::fffe:0:1]', expected: '[::fffe:0:1]:443', host: '::fffe:0:1', port: 443, kind: 'ipv6', why: 'next to, but outside, the IPv4-mapped range' },
];

for (const c of valid) {
  test(`destination ${show(c.input)} → ${c.expected.length > 60 ? `…:${c.port}` : c.expected} (${c.why})`, () => {
    const destination = normaliseDestination(c.input);
    assert.deepEqual({ ...destination }, { host: c.host, port: c.port, kind: c.kind, authority: c.expected });
    assert.equal(normaliseAuthority(c.input), c.expected);
    // Normalisation is idempotent: the stored form normalises to itself.
    assert.equal(normaliseAuthority(c.expected), c.expected);
    assert.ok(Object.isFrozen(destination));
  });
}

interface InvalidCase {
  readonly input: string;
  readonly why: string;
}

const invalid: readonly InvalidCase[] = [
  // empty
  { input: '', why: 'empty authority' },
  { input: ':', why: 'only a colon' },
  // ports
  { input: 'host:', why: 'empty port' },
  { input: ':443', why: 'empty host' },
  { input: 'host:0', why: 'port 0' },
  { input: 'host:00', why: 'port 00' },
  { input: 'host:65536', why: 'port above 65535' },
  { input: 'host:99999', why: 'five-digit port above 65535' },
  { input: 'host:100000', why: 'six-digit port' },
  { input: 'host:08', why: 'port with a leading zero' },
  { input: 'host:0443', why: 'port 443 with a leading zero' },
  { input: 'host:-1', why: 'negative port' },
  { input: 'host:+443', why: 'port with a plus sign' },
  { input: 'host:443a', why: 'port with a letter' },
  { input: 'host:0x1bb', why: 'hexadecimal port' },
  { input: 'host:4e2', why: 'port in exponent notation' },
  { input: 'host:443.0', why: 'port with a fraction' },
  { input: 'host:١٢٣', why: 'port in non-ASCII digits' },
  { input: 'host:443:443', why: 'two ports' },
  { input: 'host::443', why: 'double colon' },
  // IPv6 form
  { input: '::1', why: 'unbracketed IPv6' },
  { input: '2001:db8::1', why: 'unbracketed IPv6' },
  { input: '2001:db8::1:443', why: 'unbracketed IPv6 with what looks like a port' },
  { input: 'fe80::1', why: 'unbracketed link-local IPv6' },
  { input: '[::1', why: 'unterminated bracket' },
  { input: '::1]', why: 'closing bracket only' },
  { input: '[::1]x', why: 'text after the bracket' },
  { input: '[::1]]', why: 'two closing brackets' },
  { input: '[[::1]]', why: 'nested brackets' },
  { input: '[::1]:', why: 'bracketed IPv6 with empty port' },
  { input: '[::1]:0', why: 'bracketed IPv6 with port 0' },
  { input: '[::1]:65536', why: 'bracketed IPv6 with port above 65535' },
  { input: '[::1]:08', why: 'bracketed IPv6 with leading-zero port' },
  { input: '[::1]:443:1', why: 'bracketed IPv6 with two ports' },
  { input: '[]', why: 'empty brackets' },
  { input: '[]:443', why: 'empty brackets with port' },
  { input: '[1::2::3]', why: 'two :: in one address' },
  { input: '[1:2:3:4:5:6:7:8:9]', why: 'nine groups' },
  { input: '[1:2:3:4:5:6:7:8::]', why: 'eight groups and ::' },
  { input: '[1:2:3:4:5:6:7]', why: 'seven groups without ::' },
  { input: '[:1::]', why: 'single leading colon' },
  { input: '[00001::]', why: 'five hex digits in a group' },
  { input: '[0x1::]', why: '0x prefix in a group' },
  { input: '[::g]', why: 'non-hex digit' },
  { input: '[example.com]', why: 'hostname in brackets' },
  { input: '[1.2.3.4]', why: 'IPv4 in brackets' },
  { input: '[1.2.3.4]:443', why: 'IPv4 in brackets with port' },
  { input: 'exa[mple.com', why: 'bracket inside a hostname' },
  { input: 'example.com]:443', why: 'stray closing bracket' },
  // zone ids
  { input: '[fe80::1%eth0]', why: 'zone id' },
  { input: '[fe80::1%25eth0]:443', why: 'percent-encoded zone id' },
  { input: '[fe80::1%1]', why: 'numeric zone id' },
  { input: 'fe80::1%eth0', why: 'unbracketed zone id' },
  // IPv6 that embeds IPv4
  { input: '[::ffff:0:0]', why: 'IPv4-mapped ::ffff:0.0.0.0' },
  { input: '[::ffff:7f00:1]', why: 'IPv4-mapped 127.0.0.1 in hex' },
  { input: '[::FFFF:A00:1]:443', why: 'IPv4-mapped 10.0.0.1, uppercase' },
  { input: '[0:0:0:0:0:ffff:ffff:ffff]', why: 'IPv4-mapped 255.255.255.255, uncompressed' },
  { input: '[::ffff:1.2.3.4]', why: 'IPv4-mapped in dotted form' },
  { input: '[::2]', why: 'IPv4-compatible ::0.0.0.2' },
  { input: '[::7f00:1]', why: 'IPv4-compatible 127.0.0.1 in hex' },
  { input: '[::ffff]', why: 'IPv4-compatible ::0.0.255.255' },
  { input: '[::1:0]', why: 'IPv4-compatible ::0.1.0.0' },
  { input: '[::8000:0]', why: 'IPv4-compatible ::128.0.0.0 (high bit set)' },
  { input: '[::ffff:ffff]', why: 'IPv4-compatible ::255.255.255.255' },
  { input: '[0:0:0:0:0:0:0:2]:443', why: 'IPv4-compatible, uncompressed' },
  { input: '[::1.2.3.4]', why: 'IPv4-compatible in dotted form' },
  { input: '[::0.0.0.1]', why: 'dotted form of ::1' },
  { input: '[64:ff9b::1.2.3.4]', why: 'dotted embedded IPv4 (NAT64 prefix)' },
  { input: '[2001:db8::1.2.3.4]', why: 'dotted embedded IPv4 in a global prefix' },
  // numeric hosts must be dotted quads
  { input: '1.2.3', why: 'three-part IPv4' },
  { input: '1.2', why: 'two-part IPv4' },
  { input: '1', why: 'all-digit single label' },
  { input: '2130706433', why: 'IPv4 as one decimal number' },
  { input: '1.2.3.4.5', why: 'five-part IPv4' },
  { input: 'example.123', why: 'last label all digits' },
  { input: 'example.123:443', why: 'last label all digits, with port' },
  { input: '0x7f.1', why: 'hexadecimal IPv4 shorthand' },
  { input: '0x7f.0.0.1', why: 'hexadecimal first octet' },
  { input: '0x7f000001', why: 'IPv4 as one hexadecimal number' },
  { input: '0X7F000001', why: 'IPv4 as one hexadecimal number, uppercase' },
  { input: '1.2.3.0x4', why: 'hexadecimal last octet' },
  { input: 'example.0x1', why: 'last label starts with 0x' },
  { input: 'foo.0xample', why: 'last label starts with 0x even though it is not hex' },
  { input: '127.1', why: 'IPv4 shorthand' },
  { input: '256.1.1.1', why: 'octet above 255' },
  { input: '1.2.3.256', why: 'last octet above 255' },
  { input: '1.2.3.1000', why: 'four-digit octet' },
  { input: '01.2.3.4', why: 'leading zero (octal in some parsers)' },
  { input: '1.2.3.04', why: 'leading zero in the last octet' },
  { input: '00.0.0.0', why: 'double zero octet' },
  { input: '1..3.4', why: 'empty octet' },
  { input: '.1.2.3.4', why: 'leading dot on IPv4' },
  { input: '1.2.3.4.', why: 'trailing dot on IPv4' },
  { input: '-1.2.3.4', why: 'negative octet' },
  { input: 'a.2.3.4', why: 'letter octet in a numeric host' },
  // LDH labels and lengths
  { input: `${label(64)}.example`, why: '64-byte label' },
  { input: label(64), why: '64-byte single label' },
  { input: hostOfLength(254), why: '254-byte host' },
  { input: `${hostOfLength(254)}:443`, why: '254-byte host with port' },
  { input: 'example.com.', why: 'trailing dot' },
  { input: 'example.com.:443', why: 'trailing dot before the port' },
  { input: '.example.com', why: 'leading dot' },
  { input: 'example..com', why: 'empty label' },
  { input: '.', why: 'only a dot' },
  { input: 'ex_ample.com', why: 'underscore' },
  { input: '_srv._tcp.example.com', why: 'underscore labels' },
  { input: '-example.com', why: 'leading hyphen' },
  { input: 'example-.com', why: 'trailing hyphen' },
  { input: 'example.-com', why: 'leading hyphen on the last label' },
  { input: '*.example.com', why: 'wildcard' },
  { input: 'ex!ample.com', why: 'punctuation' },
  { input: 'ex,ample.com', why: 'comma' },
  { input: 'ex"ample.com', why: 'quote' },
  { input: 'ex;ample.com', why: 'semicolon' },
  { input: 'ex=ample.com', why: 'equals sign' },
  { input: 'ex+ample.com', why: 'plus sign' },
  { input: 'ex~ample.com', why: 'tilde' },
  { input: 'example.com\\foo', why: 'backslash' },
  // userinfo, path, query, fragment, scheme
  { input: 'user@example.com', why: 'userinfo' },
  { input: 'user:pass@example.com:443', why: 'userinfo with password' },
  { input: '@example.com', why: 'empty userinfo' },
  { input: 'example.com/', why: 'path' },
  { input: 'example.com:443/path', why: 'path after port' },
  { input: 'example.com?x=1', why: 'query' },
  { input: 'example.com:443?', why: 'empty query' },
  { input: 'example.com#frag', why: 'fragment' },
  { input: 'https://example.com', why: 'URL with scheme' },
  { input: '//example.com', why: 'network-path reference' },
  // whitespace and control characters
  { input: ' example.com', why: 'leading space' },
  { input: 'example.com ', why: 'trailing space' },
  { input: 'example.com :443', why: 'space before the port' },
  { input: 'example.com: 443', why: 'space after the colon' },
  { input: 'exa mple.com', why: 'inner space' },
  { input: 'example.com\t', why: 'tab' },
  { input: 'example.com\n', why: 'newline' },
  { input: 'example.com\r\nx: y', why: 'header injection' },
  { input: 'example.com\u0000', why: 'NUL' },
  { input: 'example.com\u007f', why: 'DEL' },
  { input: 'example.com\u0085', why: 'C1 next line' },
  { input: '[::1] ', why: 'space after IPv6' },
  // percent-encoding
  { input: 'ex%61mple.com', why: 'percent-encoded letter' },
  { input: 'example.com%3a443', why: 'percent-encoded colon' },
  { input: '%5b::1%5d:443', why: 'percent-encoded brackets' },
  // non-ASCII
  { input: 'bücher.example', why: 'non-ASCII letter (IDN must be punycode)' },
  { input: 'example.cöm', why: 'non-ASCII in the last label' },
  { input: '例え.jp', why: 'CJK host' },
  { input: 'example。com', why: 'ideographic full stop' },
  { input: 'example．com', why: 'fullwidth full stop' },
  { input: 'ｅxample.com', why: 'fullwidth letter' },
  { input: 'exa\u00a0mple.com', why: 'no-break space' },
  { input: 'exa\u200bmple.com', why: 'zero-width space' },
  { input: 'example.com\u2028', why: 'line separator' },
  { input: 'example.com:４４３', why: 'fullwidth digits in port' },
  { input: '𝟏.2.3.4', why: 'mathematical digit (astral plane)' },
  { input: 'example.com\ud800', why: 'lone surrogate' },
  // overall size
  { input: `${label(600)}`, why: 'far too long' },
];

for (const c of invalid) {
  test(`destination ${show(c.input)} is refused (${c.why})`, () => {
    for (const fn of [normaliseDestination, normaliseAuthority]) {
      assert.throws(
        () => fn(c.input),
        (error: unknown) => {
          assert.ok(error instanceof InvalidDestinationError, `expected InvalidDestinationError, got ${String(error)}`);
          assert.equal(error.code, 'ERR_DESTINATION_INVALID');
          assert.equal(error.name, 'InvalidDestinationError');
          return true;
        },
      );
    }
  });
}

test('destination: non-string input is refused with InvalidDestinationError, not a TypeError', () => {
  for (const input of [undefined, null, 443, {}, ['example.com']]) {
    assert.throws(() => normaliseDestination(input as unknown as string), InvalidDestinationError);
  }
});

test('destination: DEFAULT_PORT is 443', () => {
  assert.equal(DEFAULT_PORT, 443);
});

test('destination: the error message quotes a long authority only in part', () => {
  const long = `${label(300)}.example`;
  assert.throws(() => normaliseDestination(long), (error: unknown) => {
    assert.ok(error instanceof InvalidDestinationError);
    assert.ok(error.message.length < 200, error.message);
    return true;
  });
});
