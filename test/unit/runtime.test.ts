/**
 * Which Node.js the suite runs on. scripts/test.sh exports AGENT_GATEWAY_NODE_VERSION (the exact
 * version it put on PATH from .runtime/); the suite must be running on exactly that, and so must
 * every bin it spawns (they all use process.execPath).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { test } from 'node:test';

const ROOT = resolve(import.meta.dirname, '../..');

test(`runs on Node.js ${process.version}, the runtime scripts/test.sh selected`, () => {
  console.log(`# node:test runtime ${process.version} at ${process.execPath}`);
  const major = Number(process.versions.node.split('.')[0]);
  assert.ok(major >= 22, `package.json engines asks for Node.js >= 22, this is ${process.version}`);
  const expected = process.env.AGENT_GATEWAY_NODE_VERSION;
  if (expected) assert.equal(process.version, `v${expected}`);
});

test('the bins run the compiled output in dist/, not the TypeScript sources', () => {
  for (const name of ['agent-gateway', 'agent-gateway-registry', 'agent-gateway-sidecar']) {
    const source = readFileSync(resolve(ROOT, `bin/${name}.js`), 'utf8');
    assert.match(source, /'\.\.\/dist\/[a-z-]+\/src\/main\.js'/);
    assert.doesNotMatch(source, /tsx/);
  }
  // A child started with NODE_OPTIONS cleared cannot have tsx registered, so --help answering proves
  // the bin loads plain JavaScript.
  const out = execFileSync(process.execPath, [resolve(ROOT, 'bin/agent-gateway.js'), '--help'], {
    encoding: 'utf8',
    env: { ...process.env, NODE_OPTIONS: '' },
  });
  assert.match(out, /Usage: agent-gateway/);
});

test('npm ci compiles dist/ (the prepare step), and steps aside where there is nothing to compile with', () => {
  const pkg = JSON.parse(readFileSync(resolve(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  assert.equal(pkg.scripts.prepare, 'node scripts/prepare.mjs');
  const prepare = resolve(ROOT, 'scripts/prepare.mjs');
  const run = (cwd: string) => spawnSync(process.execPath, [prepare], { cwd, encoding: 'utf8', env: { ...process.env, npm_execpath: '' } });
  // Only package.json so far (deploy/Dockerfile's npm ci before the sources are copied).
  const bare = mkdtempSync(join(tmpdir(), 'agw-prepare-'));
  try {
    writeFileSync(join(bare, 'package.json'), '{"name":"x","private":true}\n');
    const early = run(bare);
    assert.equal(early.status, 0);
    assert.match(early.stderr, /dist\/ not built here: no sources yet/);
    // Sources but no TypeScript (npm ci --omit=dev).
    writeFileSync(join(bare, 'tsconfig.build.json'), '{}\n');
    const production = run(bare);
    assert.equal(production.status, 0);
    assert.match(production.stderr, /TypeScript is not installed/);
  } finally {
    rmSync(bare, { recursive: true, force: true });
  }
});
