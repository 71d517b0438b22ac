SELECT id, created_at, expires_at FROM {table}
WHERE tenant = $1 AND user_id = $2 AND idle_until > {now} AND {well_formed}
