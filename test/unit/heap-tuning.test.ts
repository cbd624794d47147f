/**
 * core/heap-tuning.ts in a real V8: after tuneHeapForBytePath() the heap controller grows the old
 * generation by the given percent after each full GC (V8 says so under --trace-gc-verbose), and an
 * operator's own --heap-growing-percent on node's command line wins. The tests use 25 and 50, not
 * HEAP_GROWING_PERCENT: V8's own factor reaches 4.0 (= 300%) by itself when the collector is fast
 * against the mutator, as in a tiny script, so only an unusual value shows whose factor it is.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';

const MODULE = new URL('../../core/heap-tuning.ts', import.meta.url).pathname;

/** The growing factors V8's heap controller reports for two full GCs after tuneHeapForBytePath(). */
function factors(percent: number, nodeArgs: string[]): string[] {
  const script = `
    import { tuneHeapForBytePath } from ${JSON.stringify(MODULE)};
    tuneHeapForBytePath(${percent});
    globalThis.live = Array.from({ length: 200_000 }, (_, i) => ({ i }));
    gc();
    gc();
  `;
  const out = execFileSync(process.execPath, ['--import', 'tsx', '--expose-gc', '--trace-gc-verbose', ...nodeArgs, '--input-type=module', '-e', script], {
    cwd: new URL('../..', import.meta.url).pathname,
    encoding: 'utf8',
  });
  return [...out.matchAll(/\[HeapController\] factor ([\d.]+)/g)].map((m) => m[1]!);
}

/**
 * Node 22's V8 (12.4) accepts --heap-growing-percent but its heap controller ignores it, even on
 * the command line; there the tuning does nothing, and these tests have nothing to check.
 */
const honoured = factors(25, ['--heap-growing-percent=50']).includes('1.5');
const skip = honoured ? false : `V8 ${process.versions.v8} ignores --heap-growing-percent`;

test('heap tuning: set at run time, the growing percent is what V8 uses after each full GC', { skip }, () => {
  const seen = factors(25, []);
  assert.ok(seen.length > 0, 'V8 reported its heap growing factor');
  assert.deepEqual([...new Set(seen)], ['1.2']);
});

test("heap tuning: an operator's --heap-growing-percent on node's command line is kept", { skip }, () => {
  const seen = factors(25, ['--heap-growing-percent=50']);
  assert.ok(seen.length > 0);
  assert.deepEqual([...new Set(seen)], ['1.5']);
});
