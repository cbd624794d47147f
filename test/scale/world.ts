import pg from 'pg';
import { echoDestination } from '../helpers/echo-registry.js';
import { clientCredentials, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { createDatabase, TestCluster } from '../helpers/postgres.js';
import type { RegistryFixture } from '../helpers/registry-fixture.js';
import { until } from '../helpers/wait.js';

/**
 * What the scale tests share (DESIGN §9g): a PostgreSQL primary with a migrated registry, a
 * streaming standby of it made with pg_basebackup, server TLS, a TCP echo destination and
 * principal org-alice delegated to it. Always its own clusters (TEST_DATABASE_URL cannot give a
 * standby).
 */
export interface ScaleWorld {
  readonly primary: TestCluster;
  readonly standby: TestCluster;
  readonly databaseUrl: string;
  /** The same database on the standby. */
  readonly standbyUrl: string;
  readonly tls: ServerTls;
  readonly echoAuthority: string;
  readonly fixture: RegistryFixture;
  /** An agent (new credentials unless given) granted the echo destination; waits until the standby has the grant. */
  grant(identity: string, credentials?: ClientCredentials): Promise<ClientCredentials & { readonly permissionId: string }>;
  /** Revokes a permission on the primary. */
  revoke(permissionId: string): Promise<void>;
  /** Waits until the standby has replayed everything the primary has committed. */
  caughtUp(): Promise<void>;
  close(): Promise<void>;
}

export const STANDBY_ENV = 'AGENT_GATEWAY_TEST_STANDBY_URL';

export async function startScaleWorld(): Promise<ScaleWorld> {
  const primary = await TestCluster.start();
  const databaseUrl = await createDatabase(primary.adminUrl);
  const standby = await primary.startStandby();
  const url = new URL(databaseUrl);
  url.port = String(standby.port);
  const standbyUrl = url.toString();
  const { tls, echo, echoAuthority, fixture, alice } = await echoDestination(databaseUrl);
  const primaryAdmin = new pg.Client({ connectionString: primary.adminUrl });
  await primaryAdmin.connect();
  const standbyDb = new pg.Pool({ connectionString: standbyUrl, max: 1 });
  standbyDb.on('error', () => {});
  async function caughtUp(): Promise<void> {
    const lsn = (await primaryAdmin.query('SELECT pg_current_wal_insert_lsn()::text AS lsn')).rows[0].lsn as string;
    await until(async () => {
      try {
        return (await standbyDb.query('SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn AS ok', [lsn])).rows[0].ok === true;
      } catch {
        return false; // still starting, or the database not replayed yet
      }
    }, 30_000, 'the standby has replayed the primary');
  }
  await caughtUp();
  return {
    primary,
    standby,
    databaseUrl,
    standbyUrl,
    tls,
    echoAuthority,
    fixture,
    async grant(identity, credentials) {
      const client = credentials ?? (await clientCredentials({ identity }));
      const permissionId = await fixture.permit(alice, { identity, spkiDer: client.spkiDer }, echoAuthority);
      await caughtUp();
      return { ...client, permissionId };
    },
    async revoke(permissionId) {
      await fixture.db.query('UPDATE permission_registry SET revoked_at = now() WHERE permission_id = $1', [permissionId]);
    },
    caughtUp,
    async close() {
      await standbyDb.end().catch(() => {});
      await primaryAdmin.end().catch(() => {});
      await fixture.close();
      await echo.close();
      standby.destroy();
      primary.destroy();
    },
  };
}

/** A counter's value in Prometheus text (0 when absent). */
export function metricValue(text: string, name: string, labels: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name}{${labels}}`));
  return line ? Number(line.split(' ').pop()) : 0;
}
