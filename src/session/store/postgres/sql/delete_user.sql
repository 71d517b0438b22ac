WITH gone AS (
  DELETE FROM {table} WHERE tenant = $1 AND user_id = $2
  RETURNING idle_until > {now} AND {well_formed} AS live)
SELECT count(*) FILTER (WHERE live) AS ended FROM gone
