SELECT version FROM {table} WHERE tenant = $1 AND id = $2 AND idle_until > {now}
