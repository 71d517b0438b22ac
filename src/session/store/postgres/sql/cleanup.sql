-- At most $1 expired rows, skipping rows another statement holds.
DELETE FROM {table} USING (
  SELECT tenant, id FROM {table} WHERE idle_until <= {now}
  LIMIT $1 FOR UPDATE SKIP LOCKED) AS expired
WHERE {table}.tenant = expired.tenant AND {table}.id = expired.id
