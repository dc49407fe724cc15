"""The providers this server can answer with, built from settings."""
from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import ProviderUnavailable, ValidationFailed
from ..settings import Settings
from .base import Provider

logger = logging.getLogger(__name__)

PROVIDER_NAMES = ("g4f", "openai", "local")


class ProviderRegistry:
    """Hold the configured providers and the models a client may ask each for."""

    def __init__(self, providers: dict[str, Provider], *, allowed_models: list[str] | None = None,
                 unavailable: dict[str, str] | None = None) -> None:
        self._providers = providers
        self._allowed = allowed_models or []
        self.unavailable = unavailable or {}

    def names(self) -> list[str]:
        return list(self._providers)

    def get(self, name: str) -> Provider:
        return self._providers[name]

    def models(self, name: str) -> list[str]:
        """Return the models a client may ask provider `name` for."""
        models = self._providers[name].models()
        if self._allowed:
            models = [m for m in self._allowed if m in models] or list(self._allowed)
        return models

    def default_model(self, name: str) -> str:
        return self.models(name)[0]

    def all_models(self) -> list[tuple[str, str]]:
        """Return (model, provider) pairs, the default provider first."""
        seen: set[str] = set()
        pairs = []
        for name in self._providers:
            for model in self.models(name):
                if model not in seen:
                    seen.add(model)
                    pairs.append((model, name))
        return pairs

    def provider_for_model(self, model: str, preferred: str) -> str | None:
        """Return the provider serving model, preferring `preferred`."""
        if preferred in self._providers and model in self.models(preferred):
            return preferred
        return next((n for n in self._providers if model in self.models(n)), None)

    def check_choice(self, provider: str, model: str) -> None:
        """Raise ValidationFailed unless provider is configured and serves model."""
        if provider not in self._providers:
            if provider in self.unavailable:
                raise ProviderUnavailable(
                    f"provider {provider!r} is unavailable: {self.unavailable[provider]}",
                    details=[{"field": "provider", "message": self.unavailable[provider]}])
            names = ", ".join(self._providers)
            raise ValidationFailed(f"unknown provider {provider!r}; configured: {names}",
                                   details=[{"field": "provider", "message": f"must be one of: {names}"}])
        models = self.models(provider)
        if model not in models:
            shown = ", ".join(models[:10])
            raise ValidationFailed(f"model {model!r} is not available from provider {provider!r}",
                                   details=[{"field": "model", "message": f"must be one of: {shown}"}])

    def status(self) -> dict[str, Any]:
        return {"configured": {n: p.check() for n, p in self._providers.items()},
                "unavailable": self.unavailable}

    async def aclose(self) -> None:
        """Close every provider's loop-bound clients; run on the loop thread."""
        for provider in self._providers.values():
            try:
                await provider.aclose()
            except Exception:
                logger.exception("closing provider %r failed", provider.name)

    def close(self) -> None:
        for provider in self._providers.values():
            try:
                provider.close()
            except Exception:
                logger.exception("closing provider %r failed", provider.name)


def build_registry(settings: Settings) -> ProviderRegistry:
    """Build every provider the settings make possible; the default one must build."""
    providers: dict[str, Provider] = {}
    unavailable: dict[str, str] = {}
    common = {"max_connections": settings.upstream_max_connections,
              "retry_attempts": settings.retry_attempts, "retry_backoff": settings.retry_backoff}
    models = settings.allowed_models or None

    from .g4f_backend import G4FProvider

    providers["g4f"] = G4FProvider(provider_name=settings.g4f_provider,
                                   base_url=settings.g4f_base_url, api_key=settings.llm_api_key,
                                   models=models, default_model=settings.llm_model, **common)
    if settings.llm_base_url or settings.llm_api_key or settings.llm_provider == "openai":
        from .openai_compat import OpenAICompatProvider

        providers["openai"] = OpenAICompatProvider(
            base_url=settings.llm_base_url, api_key=settings.llm_api_key, models=models or [],
            default_model=settings.llm_model, **common)
    else:
        unavailable["openai"] = "set LLM_BASE_URL (and LLM_API_KEY) to use an OpenAI-compatible API"
    try:
        from . import local
    except ImportError as exc:  # the module is optional
        unavailable["local"] = f"the local provider is not installed ({exc})"
    else:
        ok, reason = local.available(settings.local_model_path or None)
        if ok:
            providers["local"] = local.LocalProvider(
                model_path=settings.local_model_path or None, n_threads=settings.local_threads,
                max_concurrent=settings.local_max_concurrent, max_queue=settings.local_max_queue)
        elif settings.local_model_path and not os.path.isfile(settings.local_model_path):
            unavailable["local"] = f"LOCAL_MODEL_PATH={settings.local_model_path!r}: {reason}"
        else:
            unavailable["local"] = reason
    if settings.llm_provider not in providers:
        from ..settings import SettingsError

        raise SettingsError(f"LLM_PROVIDER={settings.llm_provider!r} cannot be used: "
                            f"{unavailable.get(settings.llm_provider, 'not configured')}")
    # The default provider answers first in model lists.
    ordered = {settings.llm_provider: providers[settings.llm_provider]}
    ordered.update(providers)
    return ProviderRegistry(ordered, allowed_models=settings.allowed_models, unavailable=unavailable)
