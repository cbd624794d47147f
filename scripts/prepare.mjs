// npm's `prepare` step, which `npm ci` and `npm install` run: compiles dist/, which the bins run,
// so `npx agent-gateway` works right after `npm ci` (DESIGN §2). It steps aside, successfully,
// where there is nothing to compile or nothing to compile with: an install without dev
// dependencies (`npm ci --omit=dev`, no TypeScript) or one that has only package.json and the
// lockfile so far (deploy/Dockerfile installs dependencies before it copies the sources).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';

const skip = (why) => {
  process.stderr.write(`prepare: dist/ not built here: ${why}\n`);
  process.exit(0);
};
if (!existsSync('tsconfig.build.json')) skip('no sources yet (tsconfig.build.json is missing)');
try {
  createRequire(`${process.cwd()}/package.json`).resolve('typescript/package.json');
} catch {
  skip('TypeScript is not installed (an install without dev dependencies); run `npm run build` where it is');
}
const npm = process.env.npm_execpath;
const result = npm ? spawnSync(process.execPath, [npm, 'run', '--silent', 'build'], { stdio: 'inherit' }) : spawnSync('npm', ['run', '--silent', 'build'], { stdio: 'inherit' });
process.exit(result.status ?? 1);
