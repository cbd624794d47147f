import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { GATEWAY_THREADPOOL_SIZE } from '../../gateway/src/resolver-slots.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js';
import { TEST_OID } from '../helpers/pki.js';
import { until } from '../helpers/wait.js';

let world: EchoRegistry;
let gateway: GatewayProcess;

before(async () => {
  world = await startEchoRegistry();
  gateway = await startGatewayProcess({
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath },
    policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl },
    observability: { log_level: 'info' },
    admin: { listen_addr: '127.0.0.1:0', process_metrics: false },
  });
});

after(async () => {
  await gateway?.stop();
  await world?.close();
});

/** Names of the threads of a process (Linux). */
function threadNames(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    try {
      return readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
    } catch {
      return '';
    }
  });
}

// Regression (egress review): hostname lookups (getaddrinfo) hold one of libuv's threads until the
// system resolver gives up; with Node's four, an agent's few names with dead DNS stalled every
// other agent's lookups. The bin starts the pool at GATEWAY_THREADPOOL_SIZE unless told otherwise.
test('the gateway bin runs libuv\'s thread pool at GATEWAY_THREADPOOL_SIZE threads', async () => {
  const pid = gateway.child.pid!;
  // The pool starts with its first work (the log lines' writes, already under way).
  await until(() => threadNames(pid).filter((name) => name === 'libuv-worker').length > 0, 5000, 'the pool started');
  assert.equal(threadNames(pid).filter((name) => name === 'libuv-worker').length, GATEWAY_THREADPOOL_SIZE);
});
