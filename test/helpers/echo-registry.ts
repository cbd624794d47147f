import { echoServer } from './net.js';
import { serverTls, type ServerTls } from './pki.js';
import { createDatabase, testServer } from './postgres.js';
import { at, DAY, RegistryFixture } from './registry-fixture.js';

/**
 * The world most gateway tests start from: a migrated database on a throwaway cluster, server
 * TLS material, a TCP echo server, and principal `org-alice` delegated that echo server's
 * address, so a test only has to grant its own agents.
 */
export interface EchoRegistry {
  readonly pgServer: Awaited<ReturnType<typeof testServer>>;
  readonly databaseUrl: string;
  readonly tls: ServerTls;
  readonly echo: Awaited<ReturnType<typeof echoServer>>;
  /** `127.0.0.1:PORT` of the echo server, as delegated and as a CONNECT authority. */
  readonly echoAuthority: string;
  readonly fixture: RegistryFixture;
  readonly alice: Awaited<ReturnType<RegistryFixture['principal']>>;
  /** Closes the fixture and the echo server and destroys the cluster. */
  close(): Promise<void>;
}

/** Server TLS, the echo server and org-alice delegated to it, in the migrated registry at `databaseUrl`. */
export async function echoDestination(databaseUrl: string): Promise<Pick<EchoRegistry, 'tls' | 'echo' | 'echoAuthority' | 'fixture' | 'alice'>> {
  const tls = await serverTls();
  const echo = await echoServer();
  const echoAuthority = `127.0.0.1:${echo.port}`;
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-alice', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, echoAuthority, { notBefore: at(-DAY) });
  return { tls, echo, echoAuthority, fixture, alice };
}

export async function startEchoRegistry(): Promise<EchoRegistry> {
  const pgServer = await testServer();
  const databaseUrl = await createDatabase(pgServer.url);
  const { tls, echo, echoAuthority, fixture, alice } = await echoDestination(databaseUrl);
  return {
    pgServer,
    databaseUrl,
    tls,
    echo,
    echoAuthority,
    fixture,
    alice,
    async close() {
      await fixture.close();
      await echo.close();
      pgServer.close();
    },
  };
}
