-- $3 the keys to set (a JSON object), $4 the keys to remove, $5..$7 a new lifetime (NULL:
-- unchanged). A bad row under the key is deleted on the way.
WITH bad AS (
  DELETE FROM {table} WHERE tenant = $1 AND id = $2 AND NOT {well_formed}),
changed AS (
  UPDATE {table} SET data = (data || $3::jsonb) - $4::text[],
    idle_ms = COALESCE($5, idle_ms),
    expires_at = COALESCE($6, expires_at),
    persistent = COALESCE($7, persistent),
    idle_until = LEAST({now} + COALESCE($5, idle_ms), COALESCE($6, expires_at)),
    version = version + 1
  WHERE tenant = $1 AND id = $2 AND idle_until > {now} AND {well_formed}
  RETURNING idle_until > {now} AS alive)
SELECT alive FROM changed
