/**
 * Why the gateway keeps CONNECT-rate objects in arrays, not Sets (gateway/src/bag.ts): V8 leaves a
 * rehashed Set's old table holding its entries and a pointer to the new one, so once one table is
 * old, every later member is kept alive across scavenges and promoted. This churns 32 live
 * objects of ~3 KB each (a CONNECT's worth) through a Set or an array, with ~30 KB of garbage per
 * step, and prints what V8 promoted (from --trace-gc-nvp, run in a child).
 *
 *   node --import tsx bench/set-churn.ts [steps=400000]
 *
 * One run (2026-11-30, Node 24.22.3): set 815 MB promoted, array 50 MB, of ~11 GB allocated.
 */
import { spawnSync } from 'node:child_process';

const STEPS = Number(process.argv[2] ?? 400_000);

function churn(kind: 'set' | 'array', steps: number): void {
  const members = new Set<object>();
  const ring: object[] = [];
  let sink: unknown;
  // Long enough for the (empty) Set's first table to be promoted, as a gateway's would be.
  for (let i = 0; i < 200; i++) sink = new Array(100_000).fill(i);
  for (let i = 0; i < steps; i++) {
    const member = { id: i, payload: new Array(350).fill(i) };
    ring.push(member);
    if (kind === 'set') members.add(member);
    if (ring.length > 32) {
      const gone = ring.shift()!;
      if (kind === 'set') members.delete(gone);
    }
    for (let j = 0; j < 10; j++) sink = new Array(300).fill(j);
  }
  void sink;
}

if (process.argv[3] === 'child') {
  churn(process.argv[4] as 'set' | 'array', STEPS);
} else {
  for (const kind of ['set', 'array'] as const) {
    const child = spawnSync(process.execPath, ['--trace-gc-nvp', ...process.execArgv, import.meta.filename, String(STEPS), 'child', kind], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
    if (child.status !== 0) throw new Error(`${kind}: exit ${child.status}\n${child.stderr}`);
    let allocated = 0;
    let promoted = 0;
    let collections = 0;
    for (const line of child.stdout.split('\n')) {
      const a = /\ballocated=(\d+)/.exec(line);
      const p = /\bpromoted=(\d+)/.exec(line);
      if (!a || !p) continue;
      collections++;
      allocated += Number(a[1]);
      promoted += Number(p[1]);
    }
    console.log(`${kind.padEnd(5)}  collections ${String(collections).padStart(4)}  allocated ${(allocated / 1e6).toFixed(0).padStart(6)} MB  promoted ${(promoted / 1e6).toFixed(1).padStart(7)} MB`);
  }
}
