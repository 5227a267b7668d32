-- Version 1: keys and their audit trail.
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
    updated_at    BIGINT NOT NULL
);
CREATE INDEX keys_org ON keys (org);
CREATE INDEX keys_updated_at ON keys (updated_at);
CREATE INDEX keys_revoked_at ON keys (revoked_at);
CREATE TABLE audit (
    seq     INTEGER PRIMARY KEY,
    key_id  TEXT NOT NULL,
    org     TEXT NOT NULL,
    action  TEXT NOT NULL,
    actor   TEXT NOT NULL,
    at      BIGINT NOT NULL,
    detail  TEXT
);
CREATE INDEX audit_key_id ON audit (key_id);
