# -*- test-case-name: tests.test_sqlstore -*-
"""
The tunnel service's database schema and its upgrade path.

The schema is a list of L{Migration}s, each taking a database from the
version before it to its own. A database records its version in the
C{schema_version} table (one row); L{migrate} applies the missing steps in
one transaction, so a database is either upgraded completely or left as it
was. Migrations are only ever appended: a released step never changes, and
a database newer than this code is refused rather than guessed at.

The SQL is written once for every backend (SQLite and PostgreSQL): a
L{Dialect} fills in the few type names that differ (C{{blob}}, C{{float}})
and the parameter marker (statements are written with C{?}); the rare
statement only one backend needs is an L{Only}. Both backends go through the
same versions.

Tables (version 5):
  - C{tunnels}: one row per tunnel, with its status, lifetime and deadline
    (C{expires_at}), creation C{sequence} and timestamps.
  - C{tunnel_ends}: the source and destination of each tunnel: access-token
    digest, client-token digest, spent, connected, and (version 4) the name
    of the node holding its connection.
  - C{tunnel_services}, C{tunnel_tags}: in their order (C{position}).
  - C{counters}: C{last_sequence}, the highest creation number handed out
    (SQLite).
  - C{tunnel_sequence} (version 3, PostgreSQL only): the creation numbers of
    every node sharing the database, a sequence started past C{last_sequence}.
  - C{node_leases} (version 5): until when each node's lease runs
    (L{lpxy.tunnelservice.cluster}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

__all__ = [
    "MIGRATIONS",
    "POSTGRESQL",
    "SQLITE",
    "Dialect",
    "Migration",
    "Only",
    "SchemaError",
    "migrate",
]


class SchemaError(Exception):
    """The database's schema cannot be used by this version of lpxy."""


@attrs.frozen
class Dialect:
    """What differs between database backends in the SQL written here."""

    name: str
    blob: str
    float: str
    marker: str = "?"
    """The DB-API parameter marker (C{?} for qmark, C{%s} for format)."""

    def sql(self, statement: str) -> str:
        """C{statement} (written with C{?} markers and type placeholders) for this backend."""
        text = statement.replace("{blob}", self.blob).replace("{float}", self.float)
        return text if self.marker == "?" else text.replace("?", self.marker)


SQLITE = Dialect(name="sqlite", blob="BLOB", float="REAL")
POSTGRESQL = Dialect(name="postgresql", blob="BYTEA", float="DOUBLE PRECISION", marker="%s")


@attrs.frozen
class Only:
    """A migration statement for one backend (a L{Dialect} name) only."""

    dialect: str
    statement: str


@attrs.frozen
class Migration:
    """One step of the schema: the statements taking it to C{version}."""

    version: int
    description: str
    statements: tuple[str | Only, ...]


MIGRATIONS: Sequence[Migration] = (
    Migration(1, "tunnels, their ends, services, tags and the creation counter", (
        """CREATE TABLE tunnels (
            tunnel_id TEXT PRIMARY KEY,
            arn TEXT NOT NULL,
            sequence BIGINT NOT NULL UNIQUE,
            description TEXT,
            thing_name TEXT,
            lifetime_minutes INTEGER NOT NULL,
            created_at {float} NOT NULL,
            last_updated_at {float} NOT NULL,
            status TEXT NOT NULL
        )""",
        """CREATE TABLE tunnel_ends (
            tunnel_id TEXT NOT NULL REFERENCES tunnels (tunnel_id),
            mode TEXT NOT NULL,
            token_hash {blob} NOT NULL UNIQUE,
            client_token_hash {blob},
            spent BOOLEAN NOT NULL,
            connected BOOLEAN NOT NULL,
            last_updated_at {float} NOT NULL,
            PRIMARY KEY (tunnel_id, mode)
        )""",
        """CREATE TABLE tunnel_services (
            tunnel_id TEXT NOT NULL REFERENCES tunnels (tunnel_id),
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            PRIMARY KEY (tunnel_id, position)
        )""",
        """CREATE TABLE tunnel_tags (
            tunnel_id TEXT NOT NULL REFERENCES tunnels (tunnel_id),
            position INTEGER NOT NULL,
            tag_key TEXT NOT NULL,
            tag_value TEXT NOT NULL,
            PRIMARY KEY (tunnel_id, tag_key)
        )""",
        """CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )""",
    )),
    Migration(2, "each tunnel's expiry deadline stored, not derived, and indexed", (
        # Nodes sharing a database will look for due tunnels by deadline.
        "ALTER TABLE tunnels ADD COLUMN expires_at {float}",
        "UPDATE tunnels SET expires_at = created_at + lifetime_minutes * 60",
        "CREATE INDEX tunnels_by_expiry ON tunnels (expires_at)",
    )),
    Migration(3, "creation numbers from a sequence every node shares (PostgreSQL)", (
        Only("postgresql", "CREATE SEQUENCE tunnel_sequence"),
        # Past every number handed out so far: the counter and the rows.
        Only("postgresql", """SELECT setval('tunnel_sequence', GREATEST(
            (SELECT max(value) FROM counters WHERE name = 'last_sequence'),
            (SELECT max(sequence) FROM tunnels), 0) + 1, false)"""),
    )),
    Migration(4, "the node holding each end's connection (several nodes share a database)", (
        "ALTER TABLE tunnel_ends ADD COLUMN node TEXT",
    )),
    Migration(5, "the nodes' leases (several nodes share a database)", (
        """CREATE TABLE node_leases (
            node TEXT PRIMARY KEY,
            lease_until {float} NOT NULL
        )""",
    )),
)

LATEST = MIGRATIONS[-1].version


def _version(cursor: Any) -> int | None:
    cursor.execute("SELECT version FROM schema_version")
    rows = cursor.fetchall()
    if len(rows) > 1:
        raise SchemaError(f"the schema_version table has {len(rows)} rows, not one")
    return int(rows[0][0]) if rows else None


def migrate(cursor: Any, dialect: Dialect, target: int = LATEST) -> tuple[int, int]:
    """
    Bring the database behind C{cursor} to schema version C{target}, inside
    the caller's transaction (commit it afterwards; roll it back on error).

    @return: the version found and the version now.
    @raise SchemaError: the database is newer than this code knows.
    """
    cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    found = _version(cursor)
    if found is None:
        cursor.execute(dialect.sql("INSERT INTO schema_version (version) VALUES (?)"), (0,))
        found = 0
    if found > LATEST:
        raise SchemaError(
            f"the database has schema version {found}, newer than this lpxy knows "
            f"({LATEST}): upgrade lpxy, or give another --db"
        )
    for migration in MIGRATIONS:
        if found < migration.version <= target:
            for statement in migration.statements:
                if isinstance(statement, Only):
                    if statement.dialect != dialect.name:
                        continue
                    statement = statement.statement
                cursor.execute(dialect.sql(statement))
            cursor.execute(
                dialect.sql("UPDATE schema_version SET version = ?"), (migration.version,)
            )
    return found, max(found, min(target, LATEST))
