import { sqlCanonicalTimestamp } from './timestamp.js';

/** The registry schema this build reads and writes; `schema_version` must hold exactly this. */
export const SCHEMA_VERSION = 4;

export const SCHEMA_VERSION_QUERY = 'SELECT version FROM schema_version';

/** The registry change counter (migration 0002), advanced by every registry write. */
export const CHANGE_COUNTER_QUERY = 'SELECT counter::text AS counter FROM registry_changes WHERE id = 1';

/** The channel migration 0002's triggers NOTIFY on. */
export const CHANGE_CHANNEL = 'agent_gateway_registry';

/** Most candidate rows one lookup reads; active rows for the presented key sort first. */
export const MAX_CANDIDATE_ROWS = 32;

const active = (alias: string, nullableEnd: boolean) =>
  `(${alias}.revoked_at IS NULL AND ${alias}.not_before <= now() AND ${nullableEnd ? `(${alias}.not_after IS NULL OR now() < ${alias}.not_after)` : `now() < ${alias}.not_after`})`;

/**
 * The indexed lookup behind every decision, for the identity, normalised destination and SPKI
 * DER given as SQL expressions (parameters, or a batch's columns). Every time comparison is made here, in the database's clock; the verdict, including the
 * signature check, is computed by registry/authorize.ts from these flags. Rows for other keys
 * are returned too (sorted last) so a denial can be explained in the log as a key mismatch.
 */
const candidateRowsSql = (identity: string, destination: string, spkiDer: string) => `
SELECT p.permission_id,
       p.signing_key_id,
       p.subject_identity,
       p.subject_public_key_spki_der,
       p.destination,
       ${sqlCanonicalTimestamp('p.not_before')} AS not_before,
       ${sqlCanonicalTimestamp('p.not_after')} AS not_after,
       p.signature,
       p.not_before <= now() AS permission_started,
       now() < p.not_after AS permission_unexpired,
       p.revoked_at IS NOT NULL AS permission_revoked,
       k.algorithm AS key_algorithm,
       k.public_key_spki_der AS key_spki_der,
       k.not_before <= now() AS key_started,
       (k.not_after IS NULL OR now() < k.not_after) AS key_unexpired,
       k.revoked_at IS NOT NULL AS key_revoked,
       d.signing_key_id IS NOT NULL AS delegation_exists,
       d.not_before <= now() AS delegation_started,
       (d.not_after IS NULL OR now() < d.not_after) AS delegation_unexpired,
       d.revoked_at IS NOT NULL AS delegation_revoked,
       -- How long an allowing row stays allowed, in the database's clock: until the earliest
       -- not_after of the row, its key and its delegation (the gateway's cache and expiry timers).
       (extract(epoch FROM least(p.not_after, coalesce(k.not_after, 'infinity'), coalesce(d.not_after, 'infinity')) - now()) * 1000)::float8 AS valid_for_ms
  FROM permission_registry p
  JOIN principal_signing_keys k ON k.key_id = p.signing_key_id
  LEFT JOIN principal_key_permissions d ON d.signing_key_id = p.signing_key_id AND d.destination = p.destination
 WHERE p.subject_identity = ${identity}
   AND p.destination = ${destination}
 ORDER BY p.subject_public_key_spki_der = ${spkiDer} DESC,
          coalesce(${active('p', false)} AND ${active('k', true)} AND ${active('d', true)}, false) DESC,
          p.not_after DESC
 LIMIT ${MAX_CANDIDATE_ROWS}`;

/** The one lookup per CONNECT ($1 identity, $2 normalised destination, $3 SPKI DER). */
export const CANDIDATE_ROWS_QUERY = candidateRowsSql('$1', '$2', '$3');

/**
 * The same lookup for many requests in one statement ($1 identities, $2 destinations, $3 SPKI
 * DERs, element i one request): each row says which request it answers in `request_index`
 * (1-based); a request without candidates has no row. A re-check of open tunnels after a change
 * asks this once per batch of keys: one query per key, each a round trip on a pool of a few
 * connections, took 0.3 ms a key, 3 s for 10,000 keys.
 */
export const CANDIDATE_ROWS_BATCH_QUERY = `
SELECT r.i::int AS request_index, c.*
  FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS r(identity, destination, spki_der, i)
 CROSS JOIN LATERAL (${candidateRowsSql('r.identity', 'r.destination', 'r.spki_der')}) c`;

/**
 * The candidate rows and the change counter in one statement, hence one snapshot (a standby,
 * DESIGN §9g): the rows are exactly as fresh as `change_counter` says. One row with null row
 * columns when there is no candidate.
 */
export const CANDIDATE_ROWS_WITH_COUNTER_QUERY = `
SELECT c.counter::text AS change_counter, r.*
  FROM registry_changes c
  LEFT JOIN LATERAL (${CANDIDATE_ROWS_QUERY}) r ON true
 WHERE c.id = 1`;
