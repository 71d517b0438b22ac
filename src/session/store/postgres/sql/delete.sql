DELETE FROM {table} WHERE tenant = $1 AND id = $2
