UPDATE {table} SET idle_until = LEAST({now} + idle_ms, expires_at)
WHERE tenant = $1 AND id = $2 AND idle_until > {now}
