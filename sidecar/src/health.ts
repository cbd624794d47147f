import { startProbeServer } from '../../core/probe-server.js';

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
  const server = await startProbeServer({
    host: options.host,
    port: options.port,
    routes: {
      '/healthz': () => ({ status: 200, json: { status: 'alive' } }),
      '/readyz': async () => {
        const { ready, body } = await evaluate();
        return { status: ready ? 200 : 503, json: { ready, ...body } };
      },
    },
  });
  return { port: server.address.port, close: () => server.close() };
}
