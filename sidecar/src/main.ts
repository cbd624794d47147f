import { EventEmitter } from 'node:events';
import { runSidecar } from './cli.js';

// Handlers go in before anything touches the TPM: a supervisor (or a test) may send SIGTERM the
// moment the port line appears, or while the key is being loaded, and the default action would
// kill the process without finalising PKCS#11. Without a resource manager (a bare swtpm TCTI)
// the TPM sessions of a killed process leak until the TPM runs out of them.
const stop = new AbortController();
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => stop.abort(signal));
// SIGHUP re-reads the settings (a reload during start-up has nothing to apply yet; without a
// handler SIGHUP's default action would end the process).
const reload = new EventEmitter();
process.on('SIGHUP', () => reload.emit('reload'));

const code = await runSidecar(process.argv.slice(2), { env: process.env, stdout: process.stdout, stderr: process.stderr, stop: stop.signal, reload });
// Exit now: a library handle (the OpenSSL engine, a late OTLP retry) must not keep a stopped sidecar alive.
process.exit(code);
