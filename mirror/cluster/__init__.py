"""What several replicas of one site share through PostgreSQL (asyncpg): the schema's
migrations, the site-wide fill lease per digest and the site's leader (leader.py, which
app.py asks who runs the site's chores). Imports only the standard library, asyncpg
(lazily where the default path imports the module), mirror.models, mirror.metrics and
mirror.config."""
