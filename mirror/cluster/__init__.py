"""What several replicas of one site share through PostgreSQL (asyncpg): the schema's
migrations, the site-wide fill lease per digest (lease.py), the site's leader
(leader.py, which app.py asks who runs the site's chores), site-wide keys (keys.py),
each process's view of its upstreams for every replica's web page (site_status.py,
which imports mirror.upstream_status) and the replicas' peer channel (peer_*.py: the
secret and signatures, the lease around a fill, the internal endpoints, joining at
start-up). lease.py and schema.py import only the standard library, asyncpg and
mirror.models; the peer modules sit beside api.py and fill.py (app.py mounts their
routes and calls peer_join); asyncpg is imported lazily where the default path imports
a module."""
