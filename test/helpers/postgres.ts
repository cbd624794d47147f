import { execFileSync, spawnSync } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import pg from 'pg';

/**
 * A throwaway PostgreSQL cluster for one test file: initdb in a temp dir on a free port, as the
 * `postgres` OS user when running as root (initdb refuses root). TEST_DATABASE_URL overrides it:
 * then each test database is created inside that server instead.
 */
export const MIGRATIONS_DIR = resolve(import.meta.dirname, '../../migrations');

const PG_BIN = (() => {
  const root = '/usr/lib/postgresql';
  const versions = existsSync(root) ? readdirSync(root).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a)) : [];
  for (const version of versions) {
    const bin = join(root, version, 'bin');
    if (existsSync(join(bin, 'initdb'))) return bin;
  }
  return '';
})();

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolvePort(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

function asOwner(args: string[]): string[] {
  return process.getuid?.() === 0 ? ['runuser', '-u', 'postgres', '--', ...args] : args;
}

function run(args: string[]): void {
  const [command, ...rest] = asOwner(args);
  const result = spawnSync(command!, rest, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${args.join(' ')} failed: ${result.stderr || result.stdout}`);
}

/** Clusters this process started and has not destroyed: stopped even when the run is killed. */
const liveClusters = new Set<TestCluster>();
let cleanupInstalled = false;

function installCleanup(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  // The test runner ends a timed-out file with SIGTERM; without these a killed run leaves its
  // postgres running until the machine is recycled.
  process.on('exit', () => {
    for (const cluster of liveClusters) cluster.destroy('immediate');
  });
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      for (const cluster of liveClusters) cluster.destroy('immediate');
      process.exit(signal === 'SIGINT' ? 130 : 143);
    });
  }
}

export class TestCluster {
  readonly dir: string;
  readonly port: number;
  #running = false;

  private constructor(dir: string, port: number) {
    this.dir = dir;
    this.port = port;
  }

  static async start(): Promise<TestCluster> {
    const dir = TestCluster.#newDir();
    run([join(PG_BIN, 'initdb'), '-D', join(dir, 'data'), '-U', 'postgres', '-A', 'trust', '-E', 'UTF8', '--locale=C.UTF-8', '--no-sync']);
    return TestCluster.#started(dir);
  }

  /**
   * A streaming standby of this cluster, made the way operators make one: pg_basebackup -R (it
   * writes standby.signal and primary_conninfo). Read-only; replays this cluster's WAL.
   */
  async startStandby(): Promise<TestCluster> {
    const dir = TestCluster.#newDir();
    run([join(PG_BIN, 'pg_basebackup'), '-h', '127.0.0.1', '-p', String(this.port), '-U', 'postgres', '-D', join(dir, 'data'), '-R', '-X', 'stream', '--no-sync', '-c', 'fast']);
    return TestCluster.#started(dir);
  }

  static #newDir(): string {
    if (!PG_BIN) throw new Error('PostgreSQL server binaries not found under /usr/lib/postgresql: run scripts/setup.sh');
    const dir = mkdtempSync(join(tmpdir(), 'agw-pg-'));
    if (process.getuid?.() === 0) chownSync(dir, Number(execFileSync('id', ['-u', 'postgres']).toString()), Number(execFileSync('id', ['-g', 'postgres']).toString()));
    return dir;
  }

  static async #started(dir: string): Promise<TestCluster> {
    const cluster = new TestCluster(dir, await freePort());
    installCleanup();
    liveClusters.add(cluster);
    cluster.startServer();
    return cluster;
  }

  get adminUrl(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  startServer(): void {
    run([
      join(PG_BIN, 'pg_ctl'), '-D', join(this.dir, 'data'), '-l', join(this.dir, 'server.log'), '-w', '-t', '30',
      '-o', `-c listen_addresses=127.0.0.1 -p ${this.port} -k ${this.dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off`,
      'start',
    ]);
    this.#running = true;
  }

  /** Fast shutdown: open connections are terminated, as in a database outage. */
  stopServer(mode: 'fast' | 'immediate' = 'fast'): void {
    if (!this.#running) return;
    run([join(PG_BIN, 'pg_ctl'), '-D', join(this.dir, 'data'), '-m', mode, '-w', 'stop']);
    this.#running = false;
  }

  log(): string {
    return existsSync(join(this.dir, 'server.log')) ? readFileSync(join(this.dir, 'server.log'), 'utf8') : '';
  }

  destroy(mode: 'fast' | 'immediate' = 'fast'): void {
    liveClusters.delete(this);
    try {
      this.stopServer(mode);
    } catch {
      // already gone; the directory still goes
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}

let databaseCounter = 0;

/** A fresh database, optionally migrated; returns its URL. */
export async function createDatabase(serverUrl: string, options: { migrate?: boolean } = {}): Promise<string> {
  const name = `agw_test_${process.pid}_${++databaseCounter}`;
  const admin = new pg.Client({ connectionString: serverUrl });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  if (options.migrate !== false) await applyMigrations(url.toString());
  return url.toString();
}

/** Applies migrations/ in order with psql, the way the README tells operators to. */
export async function applyMigrations(databaseUrl: string): Promise<void> {
  for (const file of readdirSync(MIGRATIONS_DIR).filter((f) => /^\d{4}_.*\.sql$/.test(f)).sort()) {
    execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', databaseUrl, '-f', join(MIGRATIONS_DIR, file)], { stdio: ['ignore', 'ignore', 'pipe'] });
  }
}

/** The server every test database lives on: TEST_DATABASE_URL, or a throwaway cluster. */
export async function testServer(): Promise<{ url: string; cluster?: TestCluster; close: () => void }> {
  const external = process.env.TEST_DATABASE_URL;
  if (external) return { url: external, close: () => {} };
  const cluster = await TestCluster.start();
  return { url: cluster.adminUrl, cluster, close: () => cluster.destroy() };
}
