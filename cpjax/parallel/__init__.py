"""Context parallelism: meshes, the load-balanced layout, ring attention strategies."""
