import { runCli } from './cli.js';
import { filtersNativeStderr, runWithNativeStderrFiltered } from './native-stderr.js';

const argv = process.argv.slice(2);
// Exit codes are decided in errors.ts; setting exitCode (not calling exit) lets stdout drain first.
process.exitCode = filtersNativeStderr(argv, process.env)
  ? await runWithNativeStderrFiltered(argv)
  : await runCli(argv, { env: process.env, stdout: process.stdout, stderr: process.stderr });
