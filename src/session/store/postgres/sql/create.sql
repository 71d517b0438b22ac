-- $1..$8: tenant, id, user, data, created, absolute end, inactivity timeout, cookie kind.
INSERT INTO {table} ({columns})
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, LEAST({now} + $7, $6), $8)
{on_conflict}
