-- Schema version 3: TPM attestation evidence for enrolled keys (DESIGN.md §9e).
--
-- One row per public key (principal signing keys and agent keys alike), keyed by its exact
-- SubjectPublicKeyInfo DER, the same bytes permission_registry and principal_signing_keys hold.
-- The registry CLI writes a row only after verifying the evidence (EK certificate chain to a
-- configured CA, credential activation, TPM2_Certify of the key by a restricted AK); a refused
-- enrolment writes nothing. The gateway never reads this table: attestation is checked when a key
-- is enrolled and granted, not per CONNECT, so the runtime role gets no access to it.
BEGIN;

CREATE TABLE key_attestations (
    public_key_spki_der   bytea PRIMARY KEY CHECK (octet_length(public_key_spki_der) > 0),
    -- JSON: format, base64 EK certificate, AK and key public areas, certify info and signature,
    -- the credential made for this enrolment, SHA-256 of the activation proof (never the secret).
    evidence              jsonb NOT NULL,
    -- The verification result: always true for rows written by the CLI; kept explicit so a row
    -- written by hand, or a later re-verification, can say false.
    verified              boolean NOT NULL,
    -- What was verified: EK issuer and serial, CA fingerprint, AK name, key name and attributes.
    verification          jsonb NOT NULL,
    -- SHA-256 of the EK certificate DER, lowercase hex: names the TPM.
    ek_certificate_sha256 text NOT NULL CHECK (ek_certificate_sha256 ~ '^[0-9a-f]{64}$'),
    verified_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX key_attestations_ek ON key_attestations (ek_certificate_sha256);

-- Challenges of enrolments split across machines (`attest challenge` on the registry side,
-- `attest activate` where the TPM is, `enrol-agent-key --proof` back on the registry side). Only
-- the SHA-256 of the secret is kept; a challenge is used once, and refused after expires_at.
CREATE TABLE attestation_challenges (
    challenge_id          text PRIMARY KEY CHECK (challenge_id ~ '^chal-[0-9a-f-]{36}$'),
    public_key_spki_der   bytea NOT NULL CHECK (octet_length(public_key_spki_der) > 0),
    -- The evidence the TPM side sent (format agent-gateway-tpm-evidence-v1), verified when the
    -- challenge was made, plus the credential made for it.
    evidence              jsonb NOT NULL,
    secret_sha256         bytea NOT NULL CHECK (octet_length(secret_sha256) = 32),
    created_at            timestamptz NOT NULL DEFAULT now(),
    expires_at            timestamptz NOT NULL,
    used_at               timestamptz NULL,
    CHECK (expires_at > created_at)
);

UPDATE schema_version SET version = 3;

COMMIT;
