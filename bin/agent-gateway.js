#!/usr/bin/env node
// Runs the gateway from the compiled output in dist/ (`npm run build`; scripts/setup.sh builds it
// when missing or older than the sources). No TypeScript tooling is loaded at run time.
import { existsSync } from 'node:fs';

const entry = new URL('../dist/gateway/src/main.js', import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write(`agent-gateway: ${entry.pathname} is missing: run \`npm run build\` (or scripts/setup.sh) first\n`);
  process.exit(1);
}
// libuv's thread pool, read once when it first starts (so here, before anything uses it), unless
// the operator chose a size: GATEWAY_THREADPOOL_SIZE in gateway/src/resolver-slots.ts says why
// (hostname lookups that cannot be cancelled); test/integration/gateway-bin.test.ts checks it.
process.env.UV_THREADPOOL_SIZE ??= '16';
await import(entry.href);
