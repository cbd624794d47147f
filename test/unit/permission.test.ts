import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  canonicalPermissionBytes,
  canonicalPermissionText,
  hasControlCharacter,
  PERMISSION_TEXT_HEADER,
} from '../../registry/permission.js';
import type { PermissionFields } from '../../registry/permission.js';
import type { CanonicalTimestamp } from '../../registry/timestamp.js';
import { InvalidDestinationError, InvalidPermissionFieldError } from '../../registry/errors.js';

// DESIGN §3 "Canonical signed text": exactly the spec's eight lines joined with "\n",
// no trailing newline, UTF-8; control characters refused.

const SUBJECT_SPKI_HEX =
  '3059301306072a8648ce3d020106082a8648ce3d03010703420004c86212ef62433d0eca633fe917c5073eba6ff4791117b2a92e3a3fb3aa11fa16692cb2873b2f0fd256268573830355f5b4041fbb61913412b681795d200ca533';

const ts = (text: string) => text as CanonicalTimestamp;

const base: PermissionFields = {
  permissionId: 'perm-1',
  signingKeyId: 'org-alice',
  subjectIdentity: 'agent-alpha',
  subjectPublicKeySpkiDer: Buffer.from(SUBJECT_SPKI_HEX, 'hex'),
  destination: 'api.example.com:443',
  notBefore: ts('2026-05-01T00:00:00.000000Z'),
  notAfter: ts('2026-06-01T00:00:00.000000Z'),
};

const SPEC_TEXT = [
  'agent-gateway-permission-v1',
  'permission_id=perm-1',
  'signing_key_id=org-alice',
  'subject_identity=agent-alpha',
  `subject_public_key_spki_der=${SUBJECT_SPKI_HEX}`,
  'destination=api.example.com:443',
  'not_before=2026-05-01T00:00:00.000000Z',
  'not_after=2026-06-01T00:00:00.000000Z',
].join('\n');

test('permission: the spec example gives exactly the eight lines, no trailing newline', () => {
  const text = canonicalPermissionText(base);
  assert.equal(text, SPEC_TEXT);
  assert.equal(text.split('\n').length, 8);
  assert.ok(!text.endsWith('\n'));
  assert.ok(text.startsWith(`${PERMISSION_TEXT_HEADER}\n`));
  assert.equal(PERMISSION_TEXT_HEADER, 'agent-gateway-permission-v1');
  assert.ok(!text.includes('\r'));
});

test('permission: canonicalPermissionBytes is the UTF-8 of the text', () => {
  const fields = { ...base, subjectIdentity: 'agent-ünïcødé-例' };
  const bytes = canonicalPermissionBytes(fields);
  assert.ok(Buffer.isBuffer(bytes));
  assert.deepEqual(bytes, Buffer.from(canonicalPermissionText(fields), 'utf8'));
  assert.ok(bytes.includes(Buffer.from('subject_identity=agent-\xc3\xbcn\xc3\xafc\xc3\xb8d\xc3\xa9-\xe4\xbe\x8b', 'latin1')));
});

test('permission: the SPKI DER is lowercase hex of every byte, leading zeros kept', () => {
  const spki = Buffer.from([0x00, 0x0a, 0xab, 0xff, 0x10]);
  const text = canonicalPermissionText({ ...base, subjectPublicKeySpkiDer: spki });
  assert.equal(text.split('\n')[4], 'subject_public_key_spki_der=000aabff10');
  const fromUint8Array = canonicalPermissionText({ ...base, subjectPublicKeySpkiDer: new Uint8Array(spki) });
  assert.equal(fromUint8Array, text);
});

interface FieldCase {
  readonly name: string;
  readonly change: Partial<PermissionFields>;
  readonly line: number;
  readonly expected: string;
}

const accepted: readonly FieldCase[] = [
  { name: 'permission id that looks like a UUID', change: { permissionId: 'perm-0b7c3a52-4b1f-4a4e-9f0e-6c0d1b2a3f4e' }, line: 1, expected: 'permission_id=perm-0b7c3a52-4b1f-4a4e-9f0e-6c0d1b2a3f4e' },
  { name: 'identity with a space', change: { subjectIdentity: 'agent alpha' }, line: 3, expected: 'subject_identity=agent alpha' },
  { name: 'identity with an equals sign', change: { subjectIdentity: 'a=b' }, line: 3, expected: 'subject_identity=a=b' },
  { name: 'identity with a no-break space (U+00A0 is not a control character)', change: { subjectIdentity: 'a\u00a0b' }, line: 3, expected: 'subject_identity=a\u00a0b' },
  { name: 'identity with an astral character', change: { subjectIdentity: 'agent-🦀' }, line: 3, expected: 'subject_identity=agent-🦀' },
  { name: 'IPv6 destination', change: { destination: '[2001:db8::1]:8443' }, line: 5, expected: 'destination=[2001:db8::1]:8443' },
  { name: 'IPv4 destination', change: { destination: '10.0.0.1:443' }, line: 5, expected: 'destination=10.0.0.1:443' },
  { name: 'microsecond not_before', change: { notBefore: ts('1969-12-31T23:59:59.999999Z') }, line: 6, expected: 'not_before=1969-12-31T23:59:59.999999Z' },
  { name: 'microsecond not_after', change: { notAfter: ts('2026-06-01T00:00:00.000001Z') }, line: 7, expected: 'not_after=2026-06-01T00:00:00.000001Z' },
];

for (const c of accepted) {
  test(`permission: ${c.name} → line ${c.line} is ${JSON.stringify(c.expected)}`, () => {
    const lines = canonicalPermissionText({ ...base, ...c.change }).split('\n');
    assert.equal(lines.length, 8);
    assert.equal(lines[c.line], c.expected);
  });
}

const CONTROL_CHARACTERS: readonly string[] = [
  '\u0000', '\u0001', '\u0008', '\t', '\n', '\u000b', '\u000c', '\r', '\u001b', '\u001f',
  '\u007f', '\u0080', '\u0085', '\u008d', '\u009b', '\u009f',
];

const TEXT_FIELDS = ['permissionId', 'signingKeyId', 'subjectIdentity'] as const;

for (const field of TEXT_FIELDS) {
  for (const char of CONTROL_CHARACTERS) {
    const code = `U+${char.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}`;
    for (const [where, value] of [['inside', `agent${char}alpha`], ['at the end', `agent-alpha${char}`]] as const) {
      test(`permission: ${field} with ${code} ${where} is refused`, () => {
        assert.throws(() => canonicalPermissionText({ ...base, [field]: value }), (error: unknown) => {
          assert.ok(error instanceof InvalidPermissionFieldError, String(error));
          assert.equal(error.code, 'ERR_PERMISSION_FIELD_INVALID');
          return true;
        });
      });
    }
  }
}

test('permission: a newline in the identity cannot forge a following field', () => {
  const forged = { ...base, subjectIdentity: 'agent-alpha\ndestination=evil.example:443' };
  assert.throws(() => canonicalPermissionText(forged), InvalidPermissionFieldError);
  assert.throws(() => canonicalPermissionBytes(forged), InvalidPermissionFieldError);
});

const refused: readonly { readonly name: string; readonly change: Record<string, unknown>; readonly error: typeof InvalidPermissionFieldError | typeof InvalidDestinationError }[] = [
  { name: 'empty permission_id', change: { permissionId: '' }, error: InvalidPermissionFieldError },
  { name: 'empty signing_key_id', change: { signingKeyId: '' }, error: InvalidPermissionFieldError },
  { name: 'empty subject_identity', change: { subjectIdentity: '' }, error: InvalidPermissionFieldError },
  { name: 'non-string subject_identity', change: { subjectIdentity: 42 }, error: InvalidPermissionFieldError },
  { name: 'identity with a lone surrogate (not encodable as UTF-8)', change: { subjectIdentity: 'agent-\ud800' }, error: InvalidPermissionFieldError },
  { name: 'empty SPKI', change: { subjectPublicKeySpkiDer: new Uint8Array(0) }, error: InvalidPermissionFieldError },
  { name: 'SPKI as a hex string', change: { subjectPublicKeySpkiDer: SUBJECT_SPKI_HEX }, error: InvalidPermissionFieldError },
  // Destinations: a destination that normalises to something else is not in stored form.
  { name: 'destination without port', change: { destination: 'api.example.com' }, error: InvalidPermissionFieldError },
  { name: 'uppercase destination', change: { destination: 'API.example.com:443' }, error: InvalidPermissionFieldError },
  { name: 'IPv6 destination not in RFC 5952 form', change: { destination: '[0:0::1]:443' }, error: InvalidPermissionFieldError },
  { name: 'IPv6 destination without port', change: { destination: '[::1]' }, error: InvalidPermissionFieldError },
  { name: 'empty destination', change: { destination: '' }, error: InvalidPermissionFieldError },
  { name: 'destination with a newline', change: { destination: 'api.example.com:443\nx' }, error: InvalidPermissionFieldError },
  // A destination that does not normalise at all is refused by normalisation itself.
  { name: 'destination with a leading-zero port', change: { destination: 'api.example.com:0443' }, error: InvalidDestinationError },
  { name: 'destination with a path', change: { destination: 'api.example.com:443/x' }, error: InvalidDestinationError },
  { name: 'destination with an underscore', change: { destination: 'api_1.example.com:443' }, error: InvalidDestinationError },
  // Timestamps must already be canonical.
  { name: 'not_before without fraction', change: { notBefore: '2026-05-01T00:00:00Z' }, error: InvalidPermissionFieldError },
  { name: 'not_before with milliseconds', change: { notBefore: '2026-05-01T00:00:00.000Z' }, error: InvalidPermissionFieldError },
  { name: 'not_before with an offset', change: { notBefore: '2026-05-01T02:00:00.000000+02:00' }, error: InvalidPermissionFieldError },
  { name: 'not_before with lowercase z', change: { notBefore: '2026-05-01T00:00:00.000000z' }, error: InvalidPermissionFieldError },
  { name: 'not_after on February 30', change: { notAfter: '2026-02-30T00:00:00.000000Z' }, error: InvalidPermissionFieldError },
  { name: 'not_after at hour 24', change: { notAfter: '2026-06-01T24:00:00.000000Z' }, error: InvalidPermissionFieldError },
  { name: 'not_after in PostgreSQL default output', change: { notAfter: '2026-06-01 00:00:00+00' }, error: InvalidPermissionFieldError },
  { name: 'empty not_after', change: { notAfter: '' }, error: InvalidPermissionFieldError },
];

for (const c of refused) {
  test(`permission: ${c.name} is refused with ${c.error.name}`, () => {
    const fields = { ...base, ...c.change } as unknown as PermissionFields;
    assert.throws(() => canonicalPermissionText(fields), c.error);
    assert.throws(() => canonicalPermissionBytes(fields), c.error);
  });
}

const controlChecks: readonly { readonly value: string; readonly expected: boolean }[] = [
  { value: 'agent-alpha', expected: false },
  { value: '', expected: false },
  { value: 'a b', expected: false },
  { value: '\u00a0', expected: false },
  { value: '\u2028', expected: false },
  { value: '~', expected: false },
  ...CONTROL_CHARACTERS.map((value) => ({ value, expected: true })),
];

for (const c of controlChecks) {
  const shown = [...c.value].map((ch) => (/[\x20-\x7e]/.test(ch) ? ch : `\\u${ch.charCodeAt(0).toString(16).padStart(4, '0')}`)).join('');
  test(`permission: hasControlCharacter("${shown}") is ${c.expected}`, () => {
    assert.equal(hasControlCharacter(c.value), c.expected);
  });
}
