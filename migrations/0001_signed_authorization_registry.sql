-- Signed authorization registry and its audit trail, schema version 1.
-- Apply with: psql -v ON_ERROR_STOP=1 -f migrations/0001_signed_authorization_registry.sql
-- Everything runs in one transaction and nothing uses IF NOT EXISTS, so a second application
-- fails on the first CREATE and changes nothing.
BEGIN;

-- Exactly one row; the gateway refuses to start unless it equals the version it was built for.
CREATE TABLE schema_version (
    version integer NOT NULL
);
INSERT INTO schema_version (version) VALUES (1);

-- P-256 public keys of principals that may sign permissions. The private keys stay in TPMs.
CREATE TABLE principal_signing_keys (
    key_id              text PRIMARY KEY CHECK (key_id <> ''),
    algorithm           text NOT NULL CHECK (algorithm = 'ecdsa-p256-sha256'),
    public_key_spki_der bytea NOT NULL CHECK (octet_length(public_key_spki_der) > 0),
    not_before          timestamptz NOT NULL,
    not_after           timestamptz NULL,   -- NULL: no expiry
    revoked_at          timestamptz NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (not_after IS NULL OR not_after > not_before)
);

-- Destinations (normalised host:port) each signing key may delegate.
CREATE TABLE principal_key_permissions (
    signing_key_id text NOT NULL REFERENCES principal_signing_keys (key_id),
    destination    text NOT NULL CHECK (destination <> ''),
    not_before     timestamptz NOT NULL,
    not_after      timestamptz NULL,        -- NULL: no expiry
    revoked_at     timestamptz NULL,
    PRIMARY KEY (signing_key_id, destination),
    CHECK (not_after IS NULL OR not_after > not_before)
);

-- Signed permissions: subject identity + exact subject key may reach one destination.
CREATE TABLE permission_registry (
    permission_id               text PRIMARY KEY CHECK (permission_id <> ''),
    signing_key_id              text NOT NULL REFERENCES principal_signing_keys (key_id),
    subject_identity            text NOT NULL CHECK (subject_identity <> ''),
    subject_public_key_spki_der bytea NOT NULL CHECK (octet_length(subject_public_key_spki_der) > 0),
    destination                 text NOT NULL CHECK (destination <> ''),
    not_before                  timestamptz NOT NULL,
    not_after                   timestamptz NOT NULL,
    revoked_at                  timestamptz NULL,
    signature                   bytea NOT NULL,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    CHECK (not_after > not_before)
);

-- The gateway's one lookup per CONNECT.
CREATE INDEX permission_registry_lookup ON permission_registry (subject_identity, destination);

-- The gateway's runtime role reads the registry and writes nothing. Roles are cluster-wide, so the
-- group role is created only when missing and only when the migrating role may create roles;
-- operators grant it to the gateway's login role.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_reader') THEN
        IF (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            CREATE ROLE agent_gateway_reader NOLOGIN;
        ELSE
            RAISE NOTICE 'role agent_gateway_reader not created: % may not create roles', current_user;
        END IF;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_reader') THEN
        GRANT SELECT ON schema_version, principal_signing_keys, principal_key_permissions, permission_registry
            TO agent_gateway_reader;
    END IF;
END
$$;

-- Audit trail. Part of schema version 1 so that the spec's one-file migration (psql -f this file)
-- is all a gateway needs before it starts.
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

-- The gateway writes audit rows as a member of this group role: INSERT only, so it can add to
-- the trail but neither read nor rewrite it. Created like agent_gateway_reader above: only when
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
