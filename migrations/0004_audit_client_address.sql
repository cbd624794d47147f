-- Schema version 4: the agent's address on every audit row (DESIGN §9g).
--
-- Behind a load balancer that sends a PROXY protocol header ([server] proxy_protocol_from), the
-- address is the one the header gives, i.e. the agent's, not the balancer's; otherwise it is the
-- TCP peer's. Nullable: rows written before this migration have none.
BEGIN;

ALTER TABLE audit_log
    ADD COLUMN client_address text NULL,
    ADD COLUMN client_port integer NULL;

UPDATE schema_version SET version = 4;

COMMIT;
