/**
 * `agent-gateway-sidecar run`: the agent's only way out is the sidecar, and a restarted sidecar
 * keeps its port. Real swtpm + tpm2-pkcs11, PostgreSQL, gateway, HTTPS destination, curl, Python
 * and real network namespaces (unshare; root here, a user namespace when unprivileged).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Gateway } from '../../gateway/src/gateway.js';
import { readPeerIdentity } from '../../registry/identity.js';
import { runSidecar } from '../../sidecar/src/cli.js';
import { NAMESPACE_INIT } from '../../sidecar/src/run.js';
import { X509Certificate } from '../../registry/x509.js';
import { httpsService } from '../helpers/chain.js';
import { startTestGateway } from '../helpers/gateway.js';
import { runFile, type CliRun } from '../registry-cli/run-cli.js';
import { echoServer } from '../helpers/net.js';
import { serverTls, TEST_OID, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';
import { SIDECAR_BIN, startSidecarProcess, type SidecarProcess } from '../helpers/sidecar-process.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { until } from '../helpers/wait.js';

const IDENTITY = 'agent-isolated';
let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let gatewayTls: ServerTls;
let serviceTls: ServerTls;
let docstore: Awaited<ReturnType<typeof httpsService>>;
let hostService: Awaited<ReturnType<typeof echoServer>>;
let dns: { port: number; close: () => void };
let gateway: Gateway;
let scratch: string;
let socketPath: string;
let sidecar: SidecarProcess;
let sidecarEnv: NodeJS.ProcessEnv;

function runArgs(command: readonly string[], flags: readonly string[] = []): string[] {
  return [SIDECAR_BIN, 'run', '--socket', socketPath, ...flags, '--', ...command];
}

/** `agent-gateway-sidecar run --socket ... -- CMD`, as an operator types it. */
function run(command: readonly string[], options: { flags?: readonly string[]; env?: NodeJS.ProcessEnv } = {}): Promise<CliRun> {
  return runFile(process.execPath, runArgs(command, options.flags), { env: options.env ?? { ...process.env, CURL_CA_BUNDLE: serviceTls.caPath }, timeoutMs: 60_000 });
}

/** A minimal DNS server on host loopback: every A query gets 127.0.0.1, so a lookup that fails inside failed for isolation. */
async function dnsServer(): Promise<{ port: number; close: () => void }> {
  const socket = createSocket('udp4');
  socket.on('message', (query, peer) => {
    if (query.length < 17) return;
    const answer = Buffer.concat([query.subarray(0, 2), Buffer.from([0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]), query.subarray(12), Buffer.from([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1])]);
    socket.send(answer, peer.port, peer.address);
  });
  socket.bind(0, '127.0.0.1');
  await once(socket, 'listening');
  return { port: socket.address().port, close: () => socket.close() };
}

/**
 * Every way around the proxy, tried from wherever it runs, in one Python process: raw TCP to each
 * port, a DNS query to the test's server, the system resolver, and curl with --noproxy to the
 * destination's real address. Prints what each one got as JSON ("ok" or the error).
 */
function bypassAttempts(): string[] {
  const ports = { gateway: gateway.address!.port, database: pgPort(), host_service: hostService.port };
  return [
    'python3',
    '-c',
    `import json, socket, subprocess
out = {}
for name, port in ${JSON.stringify(ports)}.items():
    try:
        socket.create_connection(('127.0.0.1', port), timeout=3).close(); out[name] = 'ok'
    except OSError as e:
        out[name] = repr(e)
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.sendto(b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x08docstore\\x04test\\x00\\x00\\x01\\x00\\x01', ('127.0.0.1', ${dns.port}))
    out['dns'] = 'ok' if s.recv(512)[-4:] == bytes([127, 0, 0, 1]) else 'wrong answer'
except OSError as e:
    out['dns'] = repr(e)
try:
    socket.getaddrinfo('docstore.example.com', 443); out['resolver'] = 'ok'
except OSError as e:
    out['resolver'] = repr(e)
if ${process.getuid!() === 0 ? 'True' : 'False'}:
    ns = subprocess.run(['nsenter', '--net=/proc/${process.pid}/ns/net', 'true'], capture_output=True, text=True)
    out['nsenter'] = 'ok' if ns.returncode == 0 else ns.stderr.strip()
curl = subprocess.run(['curl', '-sS', '--noproxy', '*', '--max-time', '10', '--connect-to', 'docstore.test:443:127.0.0.1:${docstore.port}', 'https://docstore.test/health'], capture_output=True, text=True)
out['curl_noproxy'] = 'ok' if curl.returncode == 0 else curl.stderr.strip()
print(json.dumps(out))`,
  ];
}

before(async () => {
  tpm = await startSwtpm();
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url);
  gatewayTls = await serverTls();
  serviceTls = await serverTls(['docstore.test']);
  docstore = await httpsService(serviceTls, 'docstore');
  hostService = await echoServer();
  dns = await dnsServer();
  gateway = await startTestGateway({ databaseUrl, tls: gatewayTls, resolve: { 'docstore.test': `127.0.0.1:${docstore.port}` } });
  scratch = mkdtempSync(join(tmpdir(), 'agw-sidecar-run-'));
  socketPath = join(scratch, 'proxy.sock');
  sidecarEnv = { ...process.env, ...tpm.env, ...QUIET_TPM_LOG_ENV, AGENT_GATEWAY_TPM_USER_PIN: 'run-user-pin', AGENT_GATEWAY_TPM_SO_PIN: 'run-so-pin' };
  sidecar = await startSidecarProcess(sidecarArgs(), sidecarEnv);
  const certificate = new X509Certificate(readFileSync(join(scratch, 'machine-client.pem'), 'utf8'));
  const peer = readPeerIdentity(new Uint8Array(certificate.rawData), TEST_OID);
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-alice', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, 'docstore.test', { notBefore: at(-DAY) });
  await fixture.permit(alice, { identity: IDENTITY, spkiDer: peer.spkiDer! }, 'docstore.test');
  await fixture.close();
});

function sidecarArgs(): string[] {
  return ['--gateway', `https://localhost:${gateway.address!.port}`, '--gateway-ca', gatewayTls.caPath, '--ext-oid', TEST_OID, '--identity', IDENTITY, '--tcti', tpm.env.TPM2_PKCS11_TCTI, '--cert-out', join(scratch, 'machine-client.pem'), '--listen-socket', socketPath];
}

after(async () => {
  await sidecar?.kill();
  await gateway?.close(100);
  await docstore?.close();
  await hostService?.close();
  dns?.close();
  pgServer?.close();
  await tpm?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

describe('run: the sidecar is the only way out', () => {
  test('the sidecar socket is mode 0600 and owned by the user the sidecar runs as', () => {
    const stat = statSync(socketPath);
    assert.ok(stat.isSocket());
    assert.equal(stat.mode & 0o777, 0o600);
    assert.equal(stat.uid, process.getuid!());
    assert.equal(sidecar.line.socket, socketPath);
  });

  test('inside, curl, Python and Node fetch reach the granted HTTPS destination through the proxy', async () => {
    const curl = await run(['curl', '-sS', '--max-time', '20', 'https://docstore.test/health']);
    assert.equal(curl.status, 0, curl.stderr);
    assert.deepEqual(JSON.parse(curl.stdout), { service: 'docstore', status: 'ok' });
    const python = await run(['python3', '-c', `import os, ssl, urllib.request
ctx = ssl.create_default_context(cafile=os.environ['CURL_CA_BUNDLE'])
print(urllib.request.urlopen('https://docstore.test/documents', context=ctx, timeout=20).read().decode())`]);
    assert.equal(python.status, 0, python.stderr);
    assert.deepEqual(JSON.parse(python.stdout), { service: 'docstore', path: '/documents' });
    // Node's fetch follows HTTPS_PROXY only because run sets NODE_USE_ENV_PROXY=1.
    const node = await run([process.execPath, '-e', "fetch('https://docstore.test/from-node').then(async (r) => console.log(r.status, await r.text()))"], { env: { ...process.env, NODE_EXTRA_CA_CERTS: serviceTls.caPath, NODE_OPTIONS: '' } });
    assert.equal(node.status, 0, node.stderr);
    assert.equal(node.stdout, '200 {"service":"docstore","path":"/from-node"}\n');
  });

  test('outside the namespace every bypass works, so each check inside can fail', async () => {
    const [attempts, ...script] = bypassAttempts();
    const outside = await runFile(attempts!, script, { env: { ...process.env, CURL_CA_BUNDLE: serviceTls.caPath }, timeoutMs: 60_000 });
    assert.equal(outside.status, 0, outside.stderr);
    const got = JSON.parse(outside.stdout) as Record<string, string>;
    for (const name of ['gateway', 'database', 'host_service', 'dns', 'curl_noproxy']) assert.equal(got[name], 'ok', `${name} outside: ${got[name]}`);
    if (process.getuid!() === 0) assert.equal(got.nsenter, 'ok', 'root outside may enter this network namespace');
    const unisolated = await run(['curl', '-sS', '--noproxy', '*', '--max-time', '10', '--connect-to', `docstore.test:443:127.0.0.1:${docstore.port}`, 'https://docstore.test/health'], { flags: ['--no-isolation'] });
    assert.equal(unisolated.status, 0, `--no-isolation lets curl bypass the proxy: ${unisolated.stderr}`);
  });

  test('inside, --noproxy, raw TCP to the gateway, the database and a host loopback service, DNS, and nsenter back out all fail', async () => {
    const inside = await run(bypassAttempts());
    assert.equal(inside.status, 0, inside.stderr);
    const got = JSON.parse(inside.stdout) as Record<string, string>;
    for (const name of ['gateway', 'database', 'host_service']) assert.match(got[name]!, /ConnectionRefused|Network is unreachable|timed out/, `${name} inside: ${got[name]}`);
    assert.match(got.dns!, /ConnectionRefused|Network is unreachable|timed out/, `a DNS query inside: ${got.dns}`);
    assert.notEqual(got.resolver, 'ok', 'the system resolver answers nothing inside');
    assert.match(got.curl_noproxy!, /Failed to connect|Couldn't connect/, `curl --noproxy inside: ${got.curl_noproxy}`);
    // Root inside a bare network namespace could walk out with nsenter; inside the user namespace it cannot
    // (and with /proc showing only its PID namespace it cannot even name the host's namespace).
    if (process.getuid!() === 0) assert.match(got.nsenter!, /Permission denied|Operation not permitted|No such file or directory/, `nsenter to the host's network inside: ${got.nsenter}`);
  });

  test('the proxy environment inside: all four variables, NO_PROXY cleared, NODE_USE_ENV_PROXY=1', async () => {
    const env = await run(['env'], { env: { ...process.env, NO_PROXY: '*', no_proxy: '*', HTTPS_PROXY: 'http://elsewhere:1' } });
    assert.equal(env.status, 0, env.stderr);
    const vars = Object.fromEntries(env.stdout.trim().split('\n').map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
    assert.match(vars.HTTPS_PROXY ?? '', /^http:\/\/127\.0\.0\.1:\d+$/);
    for (const name of ['https_proxy', 'HTTP_PROXY', 'http_proxy']) assert.equal(vars[name], vars.HTTPS_PROXY, name);
    assert.equal(vars.NO_PROXY, undefined);
    assert.equal(vars.no_proxy, undefined);
    assert.equal(vars.NODE_USE_ENV_PROXY, '1');
  });

  test('the TPM PINs of the caller (the variables the sidecar reads) do not reach CMD (they did: an agent could read its own key\'s PIN)', async () => {
    const env = await run(['env'], { env: { ...process.env, AGENT_GATEWAY_TPM_USER_PIN: 'pin-outside', AGENT_GATEWAY_TPM_SO_PIN: 'so-pin-outside', AGENT_GATEWAY_RUN_TEST_KEEP: 'kept' } });
    assert.equal(env.status, 0, env.stderr);
    assert.doesNotMatch(env.stdout, /pin-outside/);
    assert.match(env.stdout, /^AGENT_GATEWAY_RUN_TEST_KEEP=kept$/m, 'other variables still pass through');
    // Nor through the first process inside, whose environment CMD could read (when both shared a
    // user namespace); today the read itself is refused, and the PIN is not there either.
    const peek = `const fs = require('fs');
      let pid = fs.readlinkSync('/proc/self');
      for (let i = 0; i < 6; i++) {
        pid = /PPid:\\s+(\\d+)/.exec(fs.readFileSync('/proc/' + pid + '/status', 'utf8'))[1];
        if (fs.readFileSync('/proc/' + pid + '/cmdline', 'utf8').includes('${NAMESPACE_INIT}')) {
          console.log(fs.readFileSync('/proc/' + pid + '/environ', 'utf8').split('\\0').join('\\n'));
          break;
        }
      }`;
    const init = await run([process.execPath, '-e', peek], { env: { ...process.env, AGENT_GATEWAY_TPM_USER_PIN: 'pin-outside', AGENT_GATEWAY_TPM_SO_PIN: 'so-pin-outside', AGENT_GATEWAY_RUN_TEST_KEEP: 'kept' } });
    assert.doesNotMatch(init.stdout, /pin-outside/);
  });

  test('CMD sees only its own PID namespace in /proc, even after unmounting it (it saw the host\'s, and could write the memory of the unshare process outside it)', async () => {
    const look = `const fs = require('fs');
      for (const entry of fs.readdirSync('/proc').filter((name) => /^[0-9]+$/.test(name))) {
        let cmd = '?';
        try { cmd = fs.readFileSync('/proc/' + entry + '/cmdline', 'utf8').replace(/\\s+/g, ' '); } catch {}
        console.log(entry + ' ' + cmd);
      }`;
    // Root in its user namespace may try to unmount /proc to uncover the host's beneath it.
    const seen = await run(['sh', '-c', `umount /proc 2>/dev/null; umount -l /proc 2>/dev/null; exec "${process.execPath}" -e "$0"`, look]);
    assert.equal(seen.status, 0, seen.stderr);
    const processes = seen.stdout.trim().split('\n');
    assert.ok(processes.every((line) => !/^\d+ unshare /.test(line)), `the unshare process outside the PID namespace is visible:\n${seen.stdout}`);
    assert.match(processes.find((line) => line.startsWith('1 ')) ?? '', new RegExp(NAMESPACE_INIT), `pid 1 in /proc is run's first process:\n${seen.stdout}`);
    assert.ok(processes.length <= 4, `only the namespace's processes:\n${seen.stdout}`);
  });

  test("CMD's exit code and signal death pass through; 127 for a missing CMD; signals to run reach CMD", async (t) => {
    const [exit7, killed, missing] = await Promise.all([run(['sh', '-c', 'exit 7']), run(['sh', '-c', 'kill -TERM $$']), run(['no-such-command-here'])]);
    assert.equal(exit7.status, 7);
    assert.equal(killed.status, 128 + 15);
    assert.equal(missing.status, 127);
    assert.match(missing.stderr, /no-such-command-here: command not found/);
    const trapped = spawn(process.execPath, runArgs(['sh', '-c', 'trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done']), { stdio: ['ignore', 'pipe', 'inherit'] });
    // Whatever fails below, run is killed (its lifeline then ends CMD) and the pipe CMD inherited is
    // let go: a CMD left looping once held this file's process, and the whole suite, for 19 minutes.
    t.after(() => {
      trapped.kill('SIGKILL');
      trapped.stdout!.destroy();
    });
    const exited = once(trapped, 'exit');
    let output = '';
    trapped.stdout!.setEncoding('utf8');
    trapped.stdout!.on('data', (chunk: string) => (output += chunk));
    await until(() => output.includes('ready\n'), 60_000, 'CMD started inside run');
    trapped.kill('SIGTERM');
    const [code] = await exited;
    assert.equal(code, 42, 'CMD trapped the SIGTERM sent to run');
    // A signal sent at once, before the namespace is set up (or before run's handlers exist), still ends CMD.
    const marker = `${30 + Math.floor(Math.random() * 1000)}.${process.pid}`;
    const early = spawn(process.execPath, runArgs(['sleep', marker]), { stdio: 'ignore' });
    t.after(() => early.kill('SIGKILL'));
    const earlyExit = once(early, 'exit');
    early.kill('SIGTERM');
    const [earlyCode, earlySignal] = await earlyExit;
    assert.ok(earlyCode === 128 + 15 || earlySignal === 'SIGTERM', `run ended by the early SIGTERM: ${earlyCode ?? earlySignal}`);
    await until(() => running(`sleep ${marker}`).length === 0, 30_000, 'no sleep left behind');
  });

  test('what CMD leaves running is ended with the namespace', async () => {
    const marker = `${300 + Math.floor(Math.random() * 1000)}.${process.pid}`;
    const left = await run(['sh', '-c', `sleep ${marker} & exit 0`]);
    assert.equal(left.status, 0);
    assert.deepEqual(running(`sleep ${marker}`), [], 'no leftover process');
  });

  test('without namespaces run refuses (exit 125, a clear message) unless --no-isolation says so', async () => {
    const env = { ...process.env, PATH: join(scratch, 'empty-path') };
    const refused = await run(['/bin/true'], { env });
    assert.equal(refused.status, 125);
    assert.match(refused.stderr, /cannot isolate CMD in new user and network namespaces \(util-linux `unshare` is not installed\); refusing to run it unisolated without --no-isolation/);
    assert.equal((await run(['/bin/true'], { env, flags: ['--no-isolation'] })).status, 0);
    const noSocket = await runFile(process.execPath, [SIDECAR_BIN, 'run', '--socket', join(scratch, 'nothing.sock'), '--', 'true']);
    assert.equal(noSocket.status, 125);
    assert.match(noSocket.stderr, /no sidecar answers on .*nothing\.sock \(ENOENT\)/);
  });
});

describe('run hides directories from CMD (the file system is shared: another agent\'s sidecar socket and the TPM state were in reach)', () => {
  /** A directory holding a secret file and a listening Unix socket, as another agent's state holds its sidecar socket. */
  async function secretDirectory(t: { after: (fn: () => unknown) => void }): Promise<string> {
    const dir = mkdtempSync(join(tmpdir(), 'agw-hidden-'));
    writeFileSync(join(dir, 'secret'), 'tpm state\n');
    mkdirSync(join(dir, 'sub'));
    const server = createServer((peer) => (peer.on('error', () => {}), peer.end('answered\n')));
    server.listen(join(dir, 'other.sock'));
    await once(server, 'listening');
    t.after(async () => {
      server.close();
      rmSync(dir, { recursive: true, force: true });
    });
    return dir;
  }

  /** From inside CMD, in one Python process: what each way of looking at `dir` gets, as JSON. */
  function probe(dir: string): string[] {
    return [
      'python3',
      '-c',
      `import json, os, socket, subprocess, sys
d = sys.argv[1]
out = {'listing': sorted(os.listdir(d)), 'socket_dir': sorted(os.listdir(sys.argv[2]))}
try:
    c = socket.socket(socket.AF_UNIX); c.settimeout(5); c.connect(os.path.join(d, 'other.sock')); out['connect'] = 'ok'
except OSError as e:
    out['connect'] = repr(e)
out['umount'] = subprocess.run(['umount', d], capture_output=True).returncode
out['umount_lazy'] = subprocess.run(['umount', '-l', d], capture_output=True).returncode
out['after_umount'] = sorted(os.listdir(d))
try:
    out['via_pid1'] = open('/proc/1/root' + d + '/secret').read()
except OSError as e:
    out['via_pid1'] = repr(e)
try:
    open(os.path.join(d, 'new'), 'w'); out['write'] = 'ok'
except OSError as e:
    out['write'] = repr(e)
print(json.dumps(out))`,
      dir,
      dirname(socketPath),
    ];
  }

  test('a --hide directory and the socket\'s directory show empty inside; its socket cannot be connected; umount fails and it stays hidden; the proxy still works', async (t) => {
    const dir = await secretDirectory(t);
    // A directory inside another hidden one is hidden by the outer tmpfs.
    const seen = await run(probe(dir), { flags: ['--hide', join(dir, 'sub'), '--hide', dir] });
    assert.equal(seen.status, 0, seen.stderr);
    const out = JSON.parse(seen.stdout);
    assert.deepEqual(out.listing, [], 'the hidden directory is empty inside');
    assert.deepEqual(out.socket_dir, [], 'the sidecar socket\'s directory is hidden by default');
    assert.match(out.connect, /FileNotFoundError|ConnectionRefused/);
    assert.notEqual(out.umount, 0, 'umount of the hiding tmpfs fails');
    assert.notEqual(out.umount_lazy, 0, 'umount -l of the hiding tmpfs fails');
    assert.deepEqual(out.after_umount, [], 'still hidden after the umount attempts');
    assert.match(out.via_pid1, /PermissionError|FileNotFoundError/, 'not through the first process\'s root either');
    assert.match(out.write, /Read-only file system|PermissionError/);
    // The same probe without --hide sees it all, so each check above can fail.
    const visible = await run(probe(dir));
    const plain = JSON.parse(visible.stdout);
    assert.deepEqual(plain.listing, ['other.sock', 'secret', 'sub']);
    assert.equal(plain.connect, 'ok');
    // The forwarder, in the first process's mount namespace, still reaches the hidden socket.
    const curl = await run(['curl', '-sS', '--max-time', '30', 'https://docstore.test/health'], { flags: ['--hide', dir] });
    assert.equal(curl.status, 0, curl.stderr);
    assert.deepEqual(JSON.parse(curl.stdout), { service: 'docstore', status: 'ok' });
  });

  test('a --hide path that does not exist, is not a directory or is /, refuses with 125 and CMD does not run', async (t) => {
    const dir = await secretDirectory(t);
    const marker = join(dir, 'ran');
    for (const hide of [join(dir, 'missing'), join(dir, 'secret'), '/']) {
      const refused = await run(['touch', marker], { flags: ['--hide', hide] });
      assert.equal(refused.status, 125, refused.stderr);
      assert.match(refused.stderr, /cannot hide .* (ENOENT|not a directory|it is the root directory)/);
      assert.equal(existsSync(marker), false, 'CMD did not run');
    }
    const unisolated = await run(['touch', marker], { flags: ['--hide', dir, '--no-isolation'] });
    assert.equal(unisolated.status, 125);
    assert.match(unisolated.stderr, /--hide needs isolation/);
    assert.equal(existsSync(marker), false, 'CMD did not run');
  });
});

describe('a restarted sidecar keeps its port', () => {
  test('across kill -9 and restart the port stays (the stale socket is replaced); a taken port gives a new one, said in the JSON line', async () => {
    const first = sidecar.line.port as number;
    await sidecar.kill('SIGKILL');
    sidecar = await startSidecarProcess(sidecarArgs(), sidecarEnv);
    assert.equal(sidecar.line.port, first);
    assert.equal(sidecar.line.port_reused, true);
    assert.equal(readFileSync(join(scratch, 'sidecar-listen-port'), 'utf8').trim(), String(first));
    const curl = await run(['curl', '-sS', '--max-time', '20', 'https://docstore.test/health']);
    assert.equal(curl.status, 0, `the restarted sidecar serves run through the replaced socket: ${curl.stderr}`);

    await sidecar.kill('SIGKILL');
    const squatter: Server = createServer();
    squatter.listen(first, '127.0.0.1');
    await once(squatter, 'listening');
    try {
      sidecar = await startSidecarProcess(sidecarArgs(), sidecarEnv);
      assert.notEqual(sidecar.line.port, first);
      assert.equal(sidecar.line.port_reused, false);
      assert.equal(readFileSync(join(scratch, 'sidecar-listen-port'), 'utf8').trim(), String(sidecar.line.port), 'the new port is kept for next time');
    } finally {
      squatter.close();
    }
  });
});

describe('runSidecar in-process', () => {
  test('starts from argv, serves run through its socket, and resolves 0 once stopped', async () => {
    // tpm2-pkcs11 in this process reads the TPM's bus and store from process.env.
    Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
    const dir = join(scratch, 'in-process');
    mkdirSync(dir);
    const socket = join(dir, 'proxy.sock');
    const args = sidecarArgs().map((arg) => (arg === socketPath ? socket : arg === join(scratch, 'machine-client.pem') ? join(dir, 'machine-client.pem') : arg));
    const stop = new AbortController();
    let stdout = '';
    let stderr = '';
    const running = runSidecar(args, { env: sidecarEnv, stdout: { write: (text: string) => (stdout += text) }, stderr: { write: (text: string) => (stderr += text) }, log: { write: () => {} }, stop: stop.signal });
    await until(() => stdout.includes('\n') || stderr !== '', 60_000, 'the JSON line');
    const line = JSON.parse(stdout) as Record<string, unknown>;
    assert.equal(line.socket, socket);
    const curl = await runFile(process.execPath, [SIDECAR_BIN, 'run', '--socket', socket, '--', 'curl', '-sS', '--max-time', '20', 'https://docstore.test/health'], { env: { ...process.env, CURL_CA_BUNDLE: serviceTls.caPath }, timeoutMs: 60_000 });
    assert.equal(curl.status, 0, curl.stderr);
    assert.deepEqual(JSON.parse(curl.stdout), { service: 'docstore', status: 'ok' });
    stop.abort('SIGTERM');
    assert.equal(await running, 0, stderr);
    assert.equal(existsSync(socket), false, 'the socket is gone with the sidecar');
  });
});

/** Pids whose command line is exactly `command` (procps may be absent on a fresh machine). */
function running(command: string): string[] {
  return readdirSync('/proc').filter((pid) => {
    try {
      return /^\d+$/.test(pid) && readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ') === command;
    } catch {
      return false; // gone meanwhile
    }
  });
}

function pgPort(): number {
  return Number(new URL(databaseUrl).port);
}
