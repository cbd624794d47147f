import { runCli } from './cli.js';

// Exit codes are decided in errors.ts; setting exitCode (not calling exit) lets stdout drain first.
process.exitCode = await runCli(process.argv.slice(2), { env: process.env, stdout: process.stdout, stderr: process.stderr });
