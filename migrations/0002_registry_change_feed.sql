-- Schema version 2: the registry change feed (DESIGN.md §9b).
--
-- Every statement that changes one of the three registry tables advances a change counter and
-- raises NOTIFY agent_gateway_registry, in the same transaction: both become visible at commit,
-- together with the change itself. Gateways LISTEN for the notification (fast path) and poll the
-- counter (so a notification lost while their listening connection was down is still seen);
-- correctness never depends on the payload, which only carries the new counter as a hint.
--
-- The counter is one row updated in place, not a sequence: a sequence advances before commit,
-- so a gateway polling it could re-check the registry before the change is visible and then
-- never look again. The row lock serialises registry writers, which are rare and human-paced.
BEGIN;

CREATE TABLE registry_changes (
    id         smallint PRIMARY KEY CHECK (id = 1),
    counter    bigint NOT NULL,
    changed_at timestamptz NOT NULL
);
INSERT INTO registry_changes (id, counter, changed_at) VALUES (1, 0, now());

CREATE FUNCTION agent_gateway_registry_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    next_counter bigint;
BEGIN
    UPDATE registry_changes SET counter = counter + 1, changed_at = now() WHERE id = 1
        RETURNING counter INTO next_counter;
    PERFORM pg_notify('agent_gateway_registry', json_build_object('counter', next_counter, 'table', TG_TABLE_NAME)::text);
    RETURN NULL;
END
$$;

-- Statement level: one bump per statement however many rows it touched (a bulk revoke is one change).
CREATE TRIGGER principal_signing_keys_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON principal_signing_keys
    FOR EACH STATEMENT EXECUTE FUNCTION agent_gateway_registry_changed();
CREATE TRIGGER principal_key_permissions_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON principal_key_permissions
    FOR EACH STATEMENT EXECUTE FUNCTION agent_gateway_registry_changed();
CREATE TRIGGER permission_registry_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON permission_registry
    FOR EACH STATEMENT EXECUTE FUNCTION agent_gateway_registry_changed();

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'agent_gateway_reader') THEN
        GRANT SELECT ON registry_changes TO agent_gateway_reader;
    END IF;
END
$$;

UPDATE schema_version SET version = 2;

COMMIT;
