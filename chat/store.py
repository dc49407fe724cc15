"""PostgreSQL storage of conversations and messages (psycopg 3 + psycopg_pool)."""
from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import ConversationNotFound, StorageUnavailable, ValidationFailed

logger = logging.getLogger(__name__)

_MIGRATION_LOCK = 4343_0001  # advisory lock key: one migrator at a time across workers
_CONV_COLUMNS = "id, title, model, system_prompt, created_at, updated_at, message_count"
_MSG_COLUMNS = "id, role, content, created_at, model, provider, cached, finish_reason, latency_ms"


@dataclass
class Reply:
    """The assistant's side of an exchange, as stored."""

    content: str
    model: str
    provider: str
    cached: bool
    finish_reason: str
    latency_ms: int


def title_from(text: str) -> str:
    """Make a conversation title from the first user message."""
    line = " ".join(text.split())
    return line[:80]


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps([str(p) for p in parts]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, *types: Any) -> list[Any]:
    """Decode a cursor into one value per type; a forged or stale cursor is a 422, never a 500."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
        if not isinstance(parts, list) or len(parts) != len(types):
            raise ValueError
        return [kind(str(p)) for kind, p in zip(types, parts)]
    except (ValueError, TypeError):
        raise ValidationFailed("cursor is not valid", details=[
            {"field": "cursor", "message": "use the next_cursor value of a previous page"}]) from None


def conversation_json(row: dict[str, Any]) -> dict[str, Any]:
    """Shape a conversation row as API.md's conv object."""
    return {"id": str(row["id"]), "title": row["title"], "model": row["model"],
            "system_prompt": row["system_prompt"], "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]), "message_count": row["message_count"]}


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    """Shape a message row as API.md's msg object."""
    return {"id": str(row["id"]), "role": row["role"], "content": row["content"],
            "created_at": _iso(row["created_at"]), "model": row["model"],
            "cached": row["cached"], "finish_reason": row["finish_reason"]}


class Store:
    """Read and write conversations; every method checks out its own connection."""

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 20,
                 timeout: float = 5.0) -> None:
        self.url = url
        self.pool = ConnectionPool(url, min_size=min_size, max_size=max_size, timeout=timeout,
                                   kwargs={"row_factory": dict_row, "autocommit": True},
                                   open=False,
                                   name="chat-store")

    def open(self, *, wait: bool = True) -> None:
        """Open the pool and bring the schema up to date."""
        self.pool.open(wait=wait, timeout=30)
        self.migrate()

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _conn(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self.pool.connection(timeout=timeout) as conn:
                yield conn
        except PoolTimeout as exc:
            waited = self.pool.timeout if timeout is None else timeout
            raise StorageUnavailable(f"no database connection within {waited:.1f} s") from exc
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"the database cannot be reached: {exc}".split("\n")[0]) from exc

    def migrate(self) -> list[str]:
        """Apply the SQL files under chat/migrations that have not run yet, in order."""
        files = sorted(f for f in resources.files("chat.migrations").iterdir()
                       if f.name.endswith(".sql"))
        applied: list[str] = []
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in conn.execute("SELECT version FROM schema_migrations")}
            for file in files:
                version = file.name.removesuffix(".sql")
                if version in done:
                    continue
                conn.execute(file.read_text())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
        if applied:
            logger.info("applied migrations: %s", ", ".join(applied))
        return applied

    def ping(self, timeout: float = 1.0) -> dict[str, Any]:
        """Run a trivial query, waiting at most timeout for a connection; report pool figures."""
        try:
            with self.pool.connection(timeout=min(timeout, 0.05)) as conn:
                conn.execute("SELECT 1")
        except PoolTimeout:
            # Every pooled connection is busy saving chats: health must not queue behind
            # them (nor call the database down), so it asks on a connection of its own.
            try:
                with psycopg.connect(self.url, connect_timeout=max(2, int(timeout + 0.999)),
                                     autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                raise StorageUnavailable(f"the database cannot be reached: {exc}".split("\n")[0]) from exc
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"the database cannot be reached: {exc}".split("\n")[0]) from exc
        stats = self.pool.get_stats()
        return {"pool_size": stats.get("pool_size", 0), "pool_available": stats.get("pool_available", 0),
                "requests_waiting": stats.get("requests_waiting", 0)}

    # -- conversations -------------------------------------------------------
    def create_conversation(self, owner: str, *, title: str = "", model: str | None = None,
                            system_prompt: str | None = None) -> dict[str, Any]:
        with self._conn() as conn:
            row = conn.execute(
                f"INSERT INTO conversations (id, owner, title, model, system_prompt)"
                f" VALUES (%s, %s, %s, %s, %s) RETURNING {_CONV_COLUMNS}",
                (uuid.uuid4(), owner, title, model, system_prompt)).fetchone()
        assert row is not None
        return conversation_json(row)

    def get_conversation(self, owner: str, conversation_id: str) -> dict[str, Any]:
        with self._conn() as conn:
            row = conn.execute(f"SELECT {_CONV_COLUMNS} FROM conversations WHERE id = %s AND owner = %s",
                               (conversation_id, owner)).fetchone()
        if row is None:
            raise ConversationNotFound(f"conversation {conversation_id} not found")
        return conversation_json(row)

    def list_conversations(self, owner: str, *, limit: int = 20,
                           cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        params: list[Any] = [owner]
        where = "owner = %s"
        if cursor:
            stamp, ident = _decode_cursor(cursor, datetime.fromisoformat, uuid.UUID)
            where += " AND (updated_at, id) < (%s::timestamptz, %s::uuid)"
            params += [stamp, ident]
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {_CONV_COLUMNS} FROM conversations WHERE {where}"
                " ORDER BY updated_at DESC, id DESC LIMIT %s", (*params, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = (_encode_cursor(rows[-1]["updated_at"].isoformat(), rows[-1]["id"])
                       if more else None)
        return [conversation_json(r) for r in rows], next_cursor

    def get_messages(self, owner: str, conversation_id: str, *, limit: int = 100,
                     cursor: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
        conv = self.get_conversation(owner, conversation_id)
        after = _decode_cursor(cursor, int)[0] if cursor else -1
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT seq, {_MSG_COLUMNS} FROM messages WHERE conversation_id = %s AND seq > %s"
                " ORDER BY seq LIMIT %s", (conversation_id, after, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]["seq"]) if more else None
        return conv, [message_json(r) for r in rows], next_cursor

    def rename(self, owner: str, conversation_id: str, title: str) -> dict[str, Any]:
        with self._conn() as conn:
            row = conn.execute(
                f"UPDATE conversations SET title = %s, updated_at = now()"
                f" WHERE id = %s AND owner = %s RETURNING {_CONV_COLUMNS}",
                (title, conversation_id, owner)).fetchone()
        if row is None:
            raise ConversationNotFound(f"conversation {conversation_id} not found")
        return conversation_json(row)

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._conn() as conn:
            cur = conn.execute("DELETE FROM conversations WHERE id = %s AND owner = %s",
                               (conversation_id, owner))
        if cur.rowcount == 0:
            raise ConversationNotFound(f"conversation {conversation_id} not found")

    def history(self, owner: str, conversation_id: str, *, limit: int) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Return a conversation and its newest `limit` turns, oldest first, for the model."""
        conv = self.get_conversation(owner, conversation_id)
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT role, content FROM (SELECT seq, role, content FROM messages"
                " WHERE conversation_id = %s AND role <> 'system' ORDER BY seq DESC LIMIT %s) t"
                " ORDER BY seq", (conversation_id, limit)).fetchall()
        return conv, [{"role": r["role"], "content": r["content"]} for r in rows]

    # -- exchanges -----------------------------------------------------------
    def save_exchange(self, owner: str, *, conversation_id: str, create: bool,
                      turns: list[dict[str, str]], reply: Reply, title: str = "",
                      model: str | None = None, system_prompt: str | None = None) -> tuple[str, str]:
        """Store the user turn(s) and the reply in one transaction; return (conversation id, reply id)."""
        try:
            return self._save_exchange(owner, conversation_id, create, turns, reply, title,
                                       model, system_prompt)
        except psycopg.errors.UniqueViolation:
            # The client named a conversation id another caller already owns.
            raise ConversationNotFound(f"conversation {conversation_id} not found") from None

    def _save_exchange(self, owner: str, conversation_id: str, create: bool,
                       turns: list[dict[str, str]], reply: Reply, title: str,
                       model: str | None, system_prompt: str | None) -> tuple[str, str]:
        rows = [(str(uuid.uuid4()), t["role"], t["content"], None, None, False, None, None)
                for t in turns]
        rows.append((str(uuid.uuid4()), "assistant", reply.content, reply.model, reply.provider,
                     reply.cached, reply.finish_reason, reply.latency_ms))
        columns = [list(col) for col in zip(*rows)]
        # One statement, so one round trip and one implicit transaction: the turns and the
        # reply are written together or not at all. Updating the conversation row first
        # locks it, so concurrent exchanges in one conversation get distinct seq numbers.
        sql = _CREATE_EXCHANGE if create else _APPEND_EXCHANGE
        params = {"id": conversation_id, "owner": owner, "title": title, "model": model,
                  "system_prompt": system_prompt, "n": len(rows), "ids": columns[0],
                  "roles": columns[1], "contents": columns[2], "models": columns[3],
                  "providers": columns[4], "cached": columns[5], "finish": columns[6],
                  "latency": columns[7]}
        with self._conn() as conn:
            inserted = conn.execute(sql, params).rowcount
        if inserted != len(rows):
            raise ConversationNotFound(f"conversation {conversation_id} not found")
        return str(conversation_id), rows[-1][0]


_INSERT_MESSAGES = """
INSERT INTO messages (id, conversation_id, seq, role, content, model, provider, cached,
                      finish_reason, latency_ms)
SELECT m.id, c.id, c.base + m.ord - 1, m.role, m.content, m.model, m.provider, m.cached,
       m.finish, m.latency
FROM c, unnest(%(ids)s::uuid[], %(roles)s::text[], %(contents)s::text[], %(models)s::text[],
               %(providers)s::text[], %(cached)s::boolean[], %(finish)s::text[],
               %(latency)s::integer[])
     WITH ORDINALITY AS m(id, role, content, model, provider, cached, finish, latency, ord)
"""

_CREATE_EXCHANGE = """
WITH c AS (
    INSERT INTO conversations (id, owner, title, model, system_prompt, message_count)
    VALUES (%(id)s, %(owner)s, %(title)s, %(model)s, %(system_prompt)s, %(n)s)
    RETURNING id, 0 AS base
)""" + _INSERT_MESSAGES

_APPEND_EXCHANGE = """
WITH c AS (
    UPDATE conversations
    SET message_count = message_count + %(n)s, updated_at = now(),
        title = CASE WHEN title = '' THEN %(title)s ELSE title END
    WHERE id = %(id)s AND owner = %(owner)s
    RETURNING id, message_count - %(n)s AS base
)""" + _INSERT_MESSAGES
