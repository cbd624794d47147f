-- Audit trail, schema version 2 (after 0001).
-- Apply with: psql -v ON_ERROR_STOP=1 -f migrations/0002_audit_log.sql
-- One transaction: it refuses to run unless schema_version is exactly 1, and nothing uses
-- IF NOT EXISTS, so a second application fails and changes nothing.
BEGIN;

DO $$
BEGIN
    IF (SELECT count(*) FROM schema_version) <> 1 OR (SELECT version FROM schema_version) <> 1 THEN
        RAISE EXCEPTION 'migration 0002 needs schema_version 1, found %', (SELECT string_agg(version::text, ',') FROM schema_version);
    END IF;
END
$$;

-- One row per CONNECT decision, and one more per tunnel when it closes (reason 'tunnel_closed',
-- with bytes and duration; same connect_id). Append-only: the gateway's role may only INSERT.
CREATE TABLE audit_log (
    id               bigserial PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    identity         text NULL,
    spki_fingerprint text NULL,
    destination      text NULL,
    authority        text NULL,
    status           integer NOT NULL,
    reason           text NOT NULL,
    detail           text NULL,
    permission_id    text NULL,
    bytes_up         bigint NULL,
    bytes_down       bigint NULL,
    duration_ms      double precision NULL,
    trace_id         text NULL,
    connect_id       text NULL
);

-- Filters of the registry CLI's `audit` subcommand, newest first.
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_identity_at ON audit_log (identity, at);
CREATE INDEX audit_log_destination_at ON audit_log (destination, at);
CREATE INDEX audit_log_status_at ON audit_log (status, at);

UPDATE schema_version SET version = 2;

-- The gateway writes audit rows as a member of this group role: INSERT only, so it can add to
-- the trail but neither read nor rewrite it. Created like agent_gateway_reader in 0001: only when
-- missing and only when the migrating role may create roles; operators grant it to the gateway's
-- login role (together with agent_gateway_reader).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_auditor') THEN
        IF (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            CREATE ROLE agent_gateway_auditor NOLOGIN;
        ELSE
            RAISE NOTICE 'role agent_gateway_auditor not created: % may not create roles', current_user;
        END IF;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_auditor') THEN
        GRANT INSERT ON audit_log TO agent_gateway_auditor;
        GRANT USAGE ON SEQUENCE audit_log_id_seq TO agent_gateway_auditor;
    END IF;
END
$$;

COMMIT;
