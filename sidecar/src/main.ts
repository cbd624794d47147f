import { EventEmitter } from 'node:events';
import { NAMESPACE_INIT, namespaceInit, runIsolated } from './run.js';

const argv = process.argv.slice(2);
const io = { env: process.env, stdout: process.stdout, stderr: process.stderr };
// This same entry, started again as the first process inside run's namespaces.
const self = [process.execPath, ...process.execArgv, process.argv[1]!];

let code: number;
if (argv[0] === 'run') code = await runIsolated(argv.slice(1), { ...io, self });
else if (argv[0] === NAMESPACE_INIT) code = await namespaceInit(argv.slice(1), io);
else {
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
  // Loaded here, not above: `run` starts CMD without loading the TPM, TLS and tracing stack.
  const { runSidecar } = await import('./cli.js');
  // The sidecar relays every byte of its agent's tunnels, as the gateway does (core/heap-tuning.ts).
  const { tuneHeapForBytePath } = await import('../../core/heap-tuning.js');
  tuneHeapForBytePath();
  code = await runSidecar(argv, { ...io, stop: stop.signal, reload });
}
// Exit now: a library handle (the OpenSSL engine, a late OTLP retry) must not keep a finished process alive.
process.exit(code);
