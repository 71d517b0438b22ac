-- A plain read, which also says whether the slide is due: it is once the deadline fell behind
-- by more than idle_ms / 16, and then `slide` moves it.
SELECT user_id, data::text AS data, created_at, expires_at, idle_ms, persistent, version,
       {well_formed} AS well_formed,
       LEAST({now} + idle_ms, expires_at) - idle_until > idle_ms / 16 AS due
FROM {table} WHERE tenant = $1 AND id = $2 AND idle_until > {now}
