"""
The Alembic environment: chatd hands it the connection to migrate, in a
transaction that already holds the schema's lock (SQLStore.open).
"""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
