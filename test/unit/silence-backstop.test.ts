import assert from 'node:assert/strict';
import { test } from 'node:test';
import { silenceBackstopMs } from '../../gateway/src/sessions.js';

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
