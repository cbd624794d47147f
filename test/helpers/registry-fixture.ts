import pg from 'pg';
import { permissionFields, signPermission, softwareSigner, type PermissionSigner, type SignedPermission } from '../../registry/signing.js';
import { normaliseAuthority } from '../../registry/destination.js';
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

  /** Delegates many destinations to one key in one statement (scale tests); returns them normalised. */
  async delegateMany(signingKeyId: string, destinations: readonly string[], options: { notBefore?: string } = {}): Promise<string[]> {
    const normalised = destinations.map((d) => normaliseAuthority(d));
    await this.db.query(
      `INSERT INTO principal_key_permissions (signing_key_id, destination, not_before) SELECT $1, d, coalesce($3::timestamptz, now()) FROM unnest($2::text[]) d`,
      [signingKeyId, normalised, options.notBefore ?? null],
    );
    return normalised;
  }

  /** Signs and inserts one permission per destination in one statement (scale tests); returns their permission_ids. */
  async permitMany(signer: PermissionSigner, subject: { identity: string; spkiDer: Buffer }, destinations: readonly string[], options: { notBefore?: string; notAfter?: string } = {}): Promise<string[]> {
    const signed: SignedPermission[] = [];
    for (const destination of destinations) {
      signed.push(await signPermission(permissionFields({ subjectIdentity: subject.identity, subjectPublicKeySpkiDer: subject.spkiDer, destination, ...options }, signer.keyId), signer));
    }
    const column = <T>(f: (s: SignedPermission) => T) => signed.map(f);
    await this.db.query(
      `INSERT INTO permission_registry (permission_id, signing_key_id, subject_identity, subject_public_key_spki_der, destination, not_before, not_after, signature)
       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::bytea[])`,
      [
        column((s) => s.fields.permissionId),
        column((s) => s.fields.signingKeyId),
        column((s) => s.fields.subjectIdentity),
        column((s) => Buffer.from(s.fields.subjectPublicKeySpkiDer)),
        column((s) => s.fields.destination),
        column((s) => s.fields.notBefore),
        column((s) => s.fields.notAfter),
        column((s) => s.signature),
      ],
    );
    return column((s) => s.fields.permissionId);
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
