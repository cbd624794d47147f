import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SESSION_AGE_SPREAD, sessionAgeMs, silenceBackstopMs } from '../../gateway/src/sessions.js';

test('silence backstop: twice the longer idle deadline, none when either deadline is off', () => {
  const cases: Array<[idle: number, sessionIdle: number, backstop: number]> = [
    [600_000, 300_000, 1_200_000], // the defaults: 20 minutes
    [1000, 1000, 2000],
    [1000, 5000, 10_000],
    [0, 300_000, 0], // tunnels never idle out: a silent session may be a live one
    [600_000, 0, 0],
    [0, 0, 0],
  ];
  for (const [idle, sessionIdle, backstop] of cases) {
    assert.equal(silenceBackstopMs({ idle_timeout_ms: idle, session_idle_timeout_ms: sessionIdle }), backstop, `idle ${idle}, session idle ${sessionIdle}`);
  }
});

// Regression (PROXY-protocol review): every session got its GOAWAY at exactly max_session_age_ms,
// so agents that reconnected together after a restart all reconnected again together.
test('session age: a point in the last tenth of max_session_age_ms, never past it; none when off', () => {
  const cases: Array<[maxAge: number, random: number, age: number]> = [
    [0, 0.5, 0], // off
    [3_600_000, 0, 3_600_000], // never past the bound
    [3_600_000, 0.5, 3_420_000],
    [3_600_000, 0.999_999, 3_240_001],
    [600, 0.25, 585],
    [1, 0.999, 1], // at least 1 ms
  ];
  for (const [maxAge, random, age] of cases) assert.equal(sessionAgeMs(maxAge, () => random), age, `max ${maxAge}, random ${random}`);
  const ages = Array.from({ length: 1000 }, () => sessionAgeMs(1_000_000));
  assert.ok(ages.every((a) => a > 1_000_000 * (1 - SESSION_AGE_SPREAD) && a <= 1_000_000), 'within the spread');
  assert.ok(new Set(ages).size > 900, 'spread, not one deadline');
});
