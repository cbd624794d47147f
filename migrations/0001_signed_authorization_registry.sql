-- Signed authorization registry, schema version 1.
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

COMMIT;
