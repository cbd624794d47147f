#!/usr/bin/env node
// Runs the registry CLI from the compiled output in dist/ (`npm run build`; scripts/setup.sh builds it
// when missing or older than the sources). No TypeScript tooling is loaded at run time.
import { existsSync } from 'node:fs';

const entry = new URL('../dist/registry-cli/src/main.js', import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write(`agent-gateway-registry: ${entry.pathname} is missing: run \`npm run build\` (or scripts/setup.sh) first\n`);
  process.exit(1);
}
await import(entry.href);
