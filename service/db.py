"""The job table's database: engine creation (SQLite pragmas, a checked pool for servers) and the Alembic migrations,
run under a lock so that an API and its workers starting together migrate one at a time."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

__all__ = ["PG_MIGRATION_LOCK", "create_db_engine", "migrate"]


def create_db_engine(url: str) -> Engine:
    """An engine for the job table.

    SQLite gets WAL and a busy timeout so API and workers share the file. A server database (PostgreSQL,
    ``postgresql://`` meaning psycopg 3) gets a checked pool: a connection the server dropped (restart,
    failover, idle timeout) is replaced before use, and connecting gives up after 10 s instead of hanging.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
        return create_engine(parsed, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args)
    if parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


#: Key of the PostgreSQL advisory lock held while migrating (any constant bigint; "bds-migr" in ASCII).
PG_MIGRATION_LOCK = 0x6264732D6D696772


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One SQLite process migrates at a time (an API and its workers may start together): a file lock beside
    the database file. PostgreSQL takes an advisory lock inside the migration's transaction instead."""
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database:
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (run at every start; a no-op when current)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # held until this transaction commits: the others wait, then find the schema at head (PostgreSQL
            # DDL is transactional, so a process that dies mid-migration leaves nothing half-done)
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
