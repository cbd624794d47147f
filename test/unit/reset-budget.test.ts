import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ResetBudget } from '../../sidecar/src/local-proxy.js';

test('reset budget: a burst, then nothing until it refills at its rate', async () => {
  const budget = new ResetBudget(3, 20);
  assert.deepEqual([budget.take(), budget.take(), budget.take()], [true, true, true], 'the burst');
  assert.equal(budget.take(), false, 'spent');
  await sleep(120); // 20 a second: at least two tokens back
  assert.equal(budget.take(), true);
  assert.equal(budget.take(), true);
});

test("reset budget: the default stays well inside nghttp2's rapid-reset defence (a burst of 1,000, then 33 a second)", () => {
  const budget = new ResetBudget();
  let granted = 0;
  for (let i = 0; i < 2000; i++) if (budget.take()) granted++;
  assert.ok(granted > 0 && granted <= 200, `${granted} resets granted at once`);
});
