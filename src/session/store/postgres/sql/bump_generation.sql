UPDATE {table}_cache SET generation = generation + 1 RETURNING generation
