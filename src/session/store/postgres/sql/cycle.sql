-- $1, $2 the old key; $3..$10 the new row, as for `create`. The new row is written only if the
-- old one was live, in the same statement.
WITH old AS (
  DELETE FROM {table} WHERE tenant = $1 AND id = $2
  RETURNING idle_until > {now} AND {well_formed} AS live),
moved AS (
  INSERT INTO {table} ({columns})
  SELECT $3, $4, $5, $6::jsonb, $7, $8, $9, LEAST({now} + $9, $8), $10
  WHERE EXISTS (SELECT 1 FROM old WHERE live)
  {on_conflict} RETURNING 1)
SELECT count(*) AS moved FROM moved
