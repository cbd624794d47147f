/** core/log-time.ts: the same text as pino's isoTime, made anew each millisecond. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pino } from 'pino';
import { isoTimeOncePerMs } from '../../core/log-time.js';

test('log time: what pino.stdTimeFunctions.isoTime writes, and a new text when the millisecond changes', (t) => {
  t.mock.timers.enable({ apis: ['Date'], now: Date.UTC(2026, 10, 30, 23, 59, 59, 998) });
  const seen: string[] = [];
  for (let i = 0; i < 4; i++) {
    assert.equal(isoTimeOncePerMs(), pino.stdTimeFunctions.isoTime());
    assert.equal(isoTimeOncePerMs(), pino.stdTimeFunctions.isoTime(), 'twice in one millisecond');
    seen.push(isoTimeOncePerMs());
    t.mock.timers.tick(1);
  }
  assert.deepEqual(seen, [',"time":"2026-11-30T23:59:59.998Z"', ',"time":"2026-11-30T23:59:59.999Z"', ',"time":"2026-12-01T00:00:00.000Z"', ',"time":"2026-12-01T00:00:00.001Z"']);
  // The clock stepped back (NTP): the line says so, as pino's would.
  t.mock.timers.setTime(Date.UTC(2026, 10, 30, 12, 0, 0, 0));
  assert.equal(isoTimeOncePerMs(), ',"time":"2026-11-30T12:00:00.000Z"');
});
