"""What several replicas of one site share through PostgreSQL (asyncpg): the schema's
migrations and the site-wide fill lease per digest. Imports only the standard library,
asyncpg and mirror.models; nothing here is wired into the server yet (issue 16)."""
