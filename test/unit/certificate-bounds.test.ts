/**
 * DESIGN §9a: parsing a client certificate is bounded — size and extension count are read from
 * the DER headers alone, before any parser sees the certificate.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { countCertificateExtensions, MAX_CERTIFICATE_BYTES, MAX_CERTIFICATE_EXTENSIONS, readPeerIdentity } from '../../registry/identity.js';
import { clientCredentials, TEST_OID } from '../helpers/pki.js';
import * as x509 from '../../registry/x509.js';

const der = (pem: string) => Buffer.from(new x509.X509Certificate(pem).rawData);
const extensions = (n: number) => Array.from({ length: n }, (_, i) => new x509.Extension(`1.3.6.1.4.1.99999.${i}`, false, new Uint8Array([0x05, 0x00])));

test('countCertificateExtensions agrees with the X.509 parser on real certificates', async () => {
  for (const extra of [0, 1, 10, MAX_CERTIFICATE_EXTENSIONS, 200]) {
    const certificate = der((await clientCredentials({ identity: 'agent-alpha', extraExtensions: extensions(extra) })).certPem);
    assert.equal(countCertificateExtensions(certificate), new x509.X509Certificate(certificate).extensions.length, `${extra} extra`);
  }
});

const SHAPES: readonly { readonly name: string; readonly bytes: Buffer }[] = [
  { name: 'empty', bytes: Buffer.alloc(0) },
  { name: 'one byte', bytes: Buffer.from([0x30]) },
  { name: 'not a SEQUENCE', bytes: Buffer.from([0x04, 0x00]) },
  { name: 'length past the end', bytes: Buffer.from([0x30, 0x05, 0x30, 0x00]) },
  { name: 'trailing bytes after the certificate', bytes: Buffer.from([0x30, 0x02, 0x30, 0x00, 0x00]) },
  { name: 'a 4-byte length (over any bound)', bytes: Buffer.from([0x30, 0x84, 0xff, 0xff, 0xff, 0xff]) },
  { name: 'an indefinite length', bytes: Buffer.from([0x30, 0x80, 0x00, 0x00]) },
  { name: 'a high tag number', bytes: Buffer.from([0x30, 0x03, 0x1f, 0x81, 0x00]) },
  { name: 'extensions [3] whose list overruns it', bytes: Buffer.from([0x30, 0x06, 0x30, 0x04, 0xa3, 0x02, 0x30, 0x05]) },
  { name: 'an extension overrunning its list', bytes: Buffer.from([0x30, 0x08, 0x30, 0x06, 0xa3, 0x04, 0x30, 0x02, 0x30, 0x05]) },
];

for (const { name, bytes } of SHAPES) {
  test(`countCertificateExtensions: ${name} is not a certificate's shape`, () => {
    assert.equal(countCertificateExtensions(bytes), undefined);
  });
}

test('countCertificateExtensions: an empty TBS has none; [3] with two empty extensions has two', () => {
  assert.equal(countCertificateExtensions(Buffer.from([0x30, 0x02, 0x30, 0x00])), 0);
  assert.equal(countCertificateExtensions(Buffer.from([0x30, 0x0a, 0x30, 0x08, 0xa3, 0x06, 0x30, 0x04, 0x30, 0x00, 0x30, 0x00])), 2);
});

test('readPeerIdentity refuses an oversized certificate and one with too many extensions, before parsing', async () => {
  const many = der((await clientCredentials({ identity: 'agent-alpha', extraExtensions: extensions(MAX_CERTIFICATE_EXTENSIONS + 1) })).certPem);
  const peer = readPeerIdentity(many, TEST_OID);
  assert.equal(peer.ok, false);
  assert.match(!peer.ok ? peer.reason : '', new RegExp(`has ${MAX_CERTIFICATE_EXTENSIONS + 1 + 1}|has \\d+ extensions \\(at most ${MAX_CERTIFICATE_EXTENSIONS}\\)`));
  const big = Buffer.concat([Buffer.from([0x30, 0x82, 0x40, 0x01]), Buffer.alloc(0x4001)]);
  assert.ok(big.length > MAX_CERTIFICATE_BYTES);
  const oversized = readPeerIdentity(big, TEST_OID);
  assert.deepEqual(oversized, { ok: false, reason: `client certificate is ${big.length} bytes (at most ${MAX_CERTIFICATE_BYTES})` });
  const ok = readPeerIdentity(der((await clientCredentials({ identity: 'agent-alpha', extraExtensions: extensions(10) })).certPem), TEST_OID);
  assert.equal(ok.ok && ok.identity, 'agent-alpha');
});
