import { setFlagsFromString } from 'node:v8';

/**
 * How far V8 lets the old generation grow past what survived the last full GC before it starts
 * the next one, in percent (V8's --heap-growing-percent: limit = live × (1 + percent/100)).
 *
 * Why: a process that moves bytes allocates little on the JavaScript heap but a lot of
 * short-lived Buffer memory. With V8's default factor, the gateway's live heap (about 20 MB of
 * code and state) left less room below the limit than the young generation holds, so V8 started
 * incremental marking again right after each mark-compact: 44–61 mark-compacts per throughput
 * phase against 12 for a bare node:http2 proxy whose heap stays under V8's 8 MB activation
 * threshold, and 23% of the gateway's CPU in the collector (bench/compare.ts --profile). At 300:
 * 17–19 mark-compacts, and proxy CPU per GB down from 1.95–2.6 to 1.74 (download) and from
 * 1.88–2.2 to 1.41 (upload) in the same bench runs. The cost is memory: the heap may fill to four
 * times what survived the last full GC before the next (V8's own factor ranges up to 4 as well,
 * and it still caps the limit below --max-old-space-size). The live heap holds about 5.5 KiB per
 * open tunnel, so 10,000 tunnels add about 55 MB live and up to about 165 MB of headroom under
 * load; an idle tunnel's own RSS does not change (11–14 KiB in the bench).
 *
 * Node 24 only in effect: Node 22's V8 (12.4) takes the flag but its heap controller ignores it.
 */
export const HEAP_GROWING_PERCENT = 300;

/**
 * Applies HEAP_GROWING_PERCENT unless the operator chose their own on node's command line
 * (`node --heap-growing-percent=N …`; NODE_OPTIONS does not take this flag). V8 reads it at every
 * full GC, so setting it at start-up works.
 */
export function tuneHeapForBytePath(percent: number = HEAP_GROWING_PERCENT): void {
  if (process.execArgv.some((arg) => /^--heap[-_]growing[-_]percent\b/.test(arg))) return;
  setFlagsFromString(`--heap-growing-percent=${percent}`);
}
