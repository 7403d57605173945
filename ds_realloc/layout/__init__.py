"""Pure layouts and reallocation plans: meshes, strategies, shard rules, plans (no processes)."""
