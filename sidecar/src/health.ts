import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface ReadinessCheck {
  readonly name: string;
  /** Throws (or returns false) when the component is not usable. */
  readonly check: () => boolean | Promise<boolean>;
}

export interface HealthServer {
  readonly port: number;
  close(): Promise<void>;
}

/**
 * The sidecar's health port (loopback only): `/healthz` answers while the process runs;
 * `/readyz` is 200 only while every check passes (the gateway session is up and the TPM answers
 * through PKCS#11), else 503, with each check's result as JSON. Checks run at most once per
 * `cacheMs`, so a probe loop cannot keep the TPM busy.
 */
export async function startHealthServer(options: { host: string; port: number; checks: readonly ReadinessCheck[]; cacheMs?: number }): Promise<HealthServer> {
  const cacheMs = options.cacheMs ?? 1000;
  let cached: { at: number; body: Record<string, boolean | string>; ready: boolean } | undefined;
  const evaluate = async () => {
    if (cached && Date.now() - cached.at < cacheMs) return cached;
    const body: Record<string, boolean | string> = {};
    let ready = true;
    for (const { name, check } of options.checks) {
      try {
        body[name] = (await check()) === true;
      } catch (error) {
        body[name] = false;
        body[`${name}_error`] = (error as Error).message;
      }
      ready &&= body[name] === true;
    }
    cached = { at: Date.now(), body, ready };
    return cached;
  };
  const server: Server = createServer((req, res) => {
    const reply = (status: number, body: unknown) => res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(`${JSON.stringify(body)}\n`);
    if (req.method !== 'GET' && req.method !== 'HEAD') reply(405, { error: 'method not allowed' });
    else if (req.url === '/healthz') reply(200, { status: 'alive' });
    else if (req.url === '/readyz') {
      evaluate().then(
        ({ ready, body }) => reply(ready ? 200 : 503, { ready, ...body }),
        () => reply(503, { ready: false }),
      );
    } else reply(404, { error: 'not found' });
  });
  server.listen(options.port, options.host);
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
