-- Version 1: keys, their audit trail, and the change feed.
CREATE TABLE keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    org           TEXT NOT NULL,
    workspace     TEXT NOT NULL,
    tier          TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    secret_hash   TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    last_used_at  BIGINT,
    revoked_at    BIGINT,
    revoked_by    TEXT,
    rotated_from  TEXT,
    updated_at    BIGINT NOT NULL,
    -- The transaction that made the latest change: the poll's watermark. A time or a sequence
    -- number would skip a change whose transaction began before a poll and committed after it.
    change_xid    xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX keys_org ON keys (org);
CREATE INDEX keys_change_xid ON keys (change_xid);
CREATE INDEX keys_revoked_at ON keys (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE audit (
    seq     BIGSERIAL PRIMARY KEY,
    key_id  TEXT NOT NULL,
    org     TEXT NOT NULL,
    action  TEXT NOT NULL,
    actor   TEXT NOT NULL,
    at      BIGINT NOT NULL,
    detail  TEXT
);
CREATE INDEX audit_key_id ON audit (key_id);

-- Every change of a key (not a last-used write, which leaves updated_at alone) stamps its
-- transaction and notifies `tollgate_keys` with "id updated_at created", delivered at commit.
-- A purge notifies too, so replicas drop what they still cache for the key.
CREATE FUNCTION tollgate_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_keys', OLD.id || ' ' || (OLD.updated_at + 1) || ' 0');
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        RETURN NEW;
    END IF;
    NEW.change_xid := pg_current_xact_id();
    PERFORM pg_notify('tollgate_keys',
        NEW.id || ' ' || NEW.updated_at || ' ' || CASE WHEN NEW.updated_at = NEW.created_at THEN '1' ELSE '0' END);
    RETURN NEW;
END
$$;
CREATE TRIGGER keys_changed BEFORE INSERT OR UPDATE OR DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_key_changed();
