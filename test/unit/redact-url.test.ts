/**
 * core/redact-url.ts: the one redaction of URLs in messages and log lines (gateway, registry CLI,
 * OTLP endpoint). Whatever a URL carries as a password is replaced; nothing else changes.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { redactUrl } from '../../core/redact-url.js';

const cases: [name: string, url: string, expected: string][] = [
  ['userinfo password', 'postgres://admin:s3cret@db:5432/registry?sslmode=require', 'postgres://admin:redacted@db:5432/registry?sslmode=require'],
  ['libpq password parameter', 'postgres://admin@db/registry?password=s3cret', 'postgres://admin@db/registry?password=redacted'],
  ['sslpassword parameter', 'postgresql://db/registry?sslkey=/k&sslpassword=s3cret', 'postgresql://db/registry?sslkey=%2Fk&sslpassword=redacted'],
  ['both', 'postgres://u:a@db/x?password=b', 'postgres://u:redacted@db/x?password=redacted'],
  ['no password', 'postgres://admin@db/registry', 'postgres://admin@db/registry'],
  // An OTLP endpoint with credentials (regression: the gateway and the sidecar logged it as given).
  ['OTLP endpoint with credentials', 'http://collector:t0ken@otel.example:4317', 'http://collector:redacted@otel.example:4317/'],
  ['not a URL', 'not a url: s3cret', '[unparseable url]'],
];

for (const [name, url, expected] of cases) {
  test(`redactUrl: ${name}`, () => {
    const redacted = redactUrl(url);
    assert.equal(redacted, expected);
    assert.doesNotMatch(redacted, /s3cret|t0ken/);
  });
}
