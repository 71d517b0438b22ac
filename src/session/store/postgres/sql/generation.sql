SELECT max(generation) FROM {table}_cache
