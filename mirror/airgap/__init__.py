"""Air-gapped sites: ``mirror warm`` fills the cache, ``mirror export`` writes it as an OCI
image layout in a tar (a bundle), ``mirror import`` reads one into another mirror.
May import the core modules (config, models, routing, cache, index, fileio, app, server);
only cli.py imports this package."""
