CREATE TABLE IF NOT EXISTS {table} (
    tenant     text    NOT NULL,
    id         text    NOT NULL, -- SHA-256 of the session id, base64url
    user_id    text,
    data       jsonb   NOT NULL DEFAULT '{}',
    created_at bigint  NOT NULL, -- Unix ms
    expires_at bigint  NOT NULL, -- absolute end, Unix ms
    idle_ms    bigint  NOT NULL, -- inactivity timeout
    idle_until bigint  NOT NULL, -- LEAST(last use + idle_ms, expires_at)
    persistent boolean NOT NULL,
    version    bigint  NOT NULL DEFAULT 1, -- one more at every write
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS {base}_user ON {table} (tenant, user_id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {base}_idle_until ON {table} (idle_until);
-- One row: the generation of the session copies a Redis chain keeps.
CREATE TABLE IF NOT EXISTS {table}_cache (generation bigint NOT NULL);
INSERT INTO {table}_cache (generation) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM {table}_cache);
