"""The node's state in SQLite: database, migrations, file/chunk index, events."""

from ironsync.store.database import (
    Database,
    DatabaseError,
    available_migrations,
    latest_version,
    migrate_database,
    open_database,
)

__all__ = [
    "Database",
    "DatabaseError",
    "available_migrations",
    "latest_version",
    "migrate_database",
    "open_database",
]
