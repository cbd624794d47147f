import pg from 'pg';
import { permissionFields, signPermission, softwareSigner, type PermissionSigner } from '../../registry/signing.js';
import { insertDelegation, insertPermission, insertPrincipalKey } from '../../registry/store.js';
import { newP256Key, type SoftwareKey } from './pki.js';
import { createDatabase, testServer } from './postgres.js';

/** Writes registry rows the way an operator would (signed with software principal keys). */
export class RegistryFixture {
  // A pool, not one client: tests stop and restart PostgreSQL under it.
  readonly db: pg.Pool;

  private constructor(db: pg.Pool) {
    this.db = db;
  }

  static async connect(url: string): Promise<RegistryFixture> {
    const db = new pg.Pool({ connectionString: url, max: 2 });
    db.on('error', () => {});
    await db.query('SELECT 1');
    return new RegistryFixture(db);
  }

  async principal(keyId: string, options: { notBefore?: string; notAfter?: string; key?: SoftwareKey } = {}): Promise<PermissionSigner & { key: SoftwareKey }> {
    const key = options.key ?? newP256Key();
    await insertPrincipalKey(this.db, { keyId, publicKeySpkiDer: key.spkiDer, ...options });
    return { ...softwareSigner(keyId, key.privateKey, key.spkiDer), key };
  }

  async delegate(signingKeyId: string, destination: string, options: { notBefore?: string; notAfter?: string } = {}): Promise<string> {
    return insertDelegation(this.db, { signingKeyId, destination, ...options });
  }

  /** Signs and inserts a permission; returns its permission_id. */
  async permit(
    signer: PermissionSigner,
    subject: { identity: string; spkiDer: Buffer },
    destination: string,
    options: { notBefore?: string; notAfter?: string; permissionId?: string } = {},
  ): Promise<string> {
    const fields = permissionFields({ subjectIdentity: subject.identity, subjectPublicKeySpkiDer: subject.spkiDer, destination, ...options }, signer.keyId);
    await insertPermission(this.db, await signPermission(fields, signer));
    return fields.permissionId;
  }

  async close(): Promise<void> {
    await this.db.end();
  }
}

/** A migrated registry database of its own (on a throwaway cluster or TEST_DATABASE_URL) and a fixture on it. */
export async function registryDatabase(): Promise<{ databaseUrl: string; fixture: RegistryFixture; close: () => Promise<void> }> {
  const server = await testServer();
  const databaseUrl = await createDatabase(server.url);
  const fixture = await RegistryFixture.connect(databaseUrl);
  return {
    databaseUrl,
    fixture,
    close: async () => {
      await fixture.close();
      server.close();
    },
  };
}

/** RFC 3339 for now + `ms` (negative for the past). */
export function at(ms: number): string {
  return new Date(Date.now() + ms).toISOString();
}

export const HOUR = 3600_000;
export const DAY = 24 * HOUR;
