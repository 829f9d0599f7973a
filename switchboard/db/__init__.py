"""The store: Postgres with row-level security, reached through workspace-scoped transactions."""

from switchboard.db.database import Connection, Database, connect_database

__all__ = ["Connection", "Database", "connect_database"]
