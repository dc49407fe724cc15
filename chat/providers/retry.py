"""Retry transient upstream failures with backoff and jitter, inside the request deadline."""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from tenacity import (AsyncRetrying, RetryCallState, Retrying, retry_if_exception,
                      stop_after_attempt, stop_before_delay, wait_random_exponential)

from .. import metrics

logger = logging.getLogger(__name__)


# Retries happen on the loop and pool threads, where prometheus_client's locks (gevent's,
# after patching) must not be taken; they wait here (deque appends are thread-safe) until
# a request greenlet moves them into the metrics with flush_retries().
_pending: collections.deque[str] = collections.deque()


def flush_retries() -> None:
    """Count the retries made since the last call; call from a request greenlet."""
    while _pending:
        metrics.UPSTREAM_RETRIES.labels(provider=_pending.popleft()).inc()


def _log_retry(provider: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        _pending.append(provider)
        exc = state.outcome.exception() if state.outcome else None
        logger.warning("provider %r attempt %d failed (%s); retrying in %.2f s", provider,
                       state.attempt_number, type(exc).__name__, state.upcoming_sleep)
    return before_sleep


def _policy(provider: str, *, attempts: int, backoff: float, deadline: float,
            is_transient: Callable[[BaseException], bool]) -> dict[str, Any]:
    # stop_before_delay gives up when the next sleep would run past the deadline,
    # so a retry never pushes a request beyond its one deadline.
    budget = max(deadline - time.monotonic(), 0.0)
    return dict(
        stop=stop_after_attempt(attempts) | stop_before_delay(budget),
        wait=wait_random_exponential(multiplier=backoff, max=max(backoff * 8, 0.01)),
        retry=retry_if_exception(is_transient),
        before_sleep=_log_retry(provider),
        reraise=True,
    )


def sync_retrying(provider: str, **kwargs: Any) -> Retrying:
    """Return a tenacity loop for blocking calls."""
    return Retrying(**_policy(provider, **kwargs))


def async_retrying(provider: str, **kwargs: Any) -> AsyncRetrying:
    """Return a tenacity loop for coroutines."""
    return AsyncRetrying(**_policy(provider, **kwargs))


def remaining(deadline: float) -> float:
    """Return the seconds left before deadline, never negative."""
    return max(deadline - time.monotonic(), 0.0)
