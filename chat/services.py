"""Build and close the per-process services: store, cache, dispatcher, providers, chat."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from .cache import ResponseCache
from .dispatcher import Dispatcher
from .embedded_db import EmbeddedPostgres, database_url
from .providers import ProviderRegistry, build_registry
from .service import ChatService
from .settings import Settings
from .store import Store

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a worker process holds; views reach it through app.extensions['chat']."""

    settings: Settings
    store: Store
    cache: ResponseCache
    dispatcher: Dispatcher
    providers: ProviderRegistry
    chat: ChatService
    embedded: EmbeddedPostgres | None = None
    started_at: float = field(default_factory=time.time)
    closed: bool = False

    def close(self) -> None:
        """Stop the loop thread and the pool, close clients and the database."""
        if self.closed:
            return
        self.closed = True
        if self.dispatcher.loop_usable():
            try:
                self.dispatcher.run_async(self.providers.aclose, timeout=3)
            except Exception:
                logger.warning("provider clients did not close cleanly", exc_info=True)
        self.dispatcher.close()
        self.providers.close()
        self.store.close()
        if self.embedded is not None:
            self.embedded.stop()


def build_services(settings: Settings) -> Services:
    """Create every service from settings; open the database and migrate it."""
    # Providers first: a default provider that cannot run (LLM_PROVIDER=local without the
    # model) stops the start with a SettingsError before a database or a thread is opened.
    providers = build_registry(settings)
    try:
        url, embedded = database_url(settings.database_url, settings.data_dir)
    except Exception:
        providers.close()
        raise
    # Under heavy load a reply may wait a while for a connection to be saved; with the
    # database down, callers should not wait the whole request deadline to hear it.
    store = Store(url, min_size=settings.db_pool_min, max_size=settings.db_pool_max,
                  timeout=max(5.0, min(settings.request_timeout, 10.0)))
    try:
        store.open()
    except Exception:
        providers.close()
        if embedded is not None:
            embedded.stop()
        raise
    cache = ResponseCache(ttl=settings.cache_ttl, max_entries=settings.cache_max_entries,
                          redis_url=settings.redis_url,
                          generation_file=os.environ.get("CHAT_CACHE_GENERATION_FILE", ""))
    dispatcher = Dispatcher(pool_size=settings.thread_pool_size,
                            max_inflight=settings.max_inflight,
                            loop_max_tasks=settings.loop_max_tasks)
    dispatcher.start()
    chat = ChatService(store=store, cache=cache, dispatcher=dispatcher, providers=providers,
                       request_timeout=settings.request_timeout,
                       history_limit=settings.max_messages,
                       default_provider=settings.llm_provider, default_model=settings.llm_model)
    return Services(settings, store, cache, dispatcher, providers, chat, embedded)
