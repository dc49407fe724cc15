"""Settings: defaults, then `.env`, then the environment, then explicit overrides."""
from __future__ import annotations

import os
from typing import Any, Literal

from dotenv import load_dotenv
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from limits import parse_many


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""


def _split(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value or [])


class Settings(BaseModel):
    """Every setting of the server, validated once at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(4343, ge=1, le=65535)
    llm_provider: Literal["g4f", "openai", "local"] = "g4f"
    llm_model: str = "gpt-4o-mini"
    allowed_models: list[str] = Field(default_factory=list)
    llm_base_url: str = ""
    llm_api_key: str = ""
    g4f_provider: str = ""
    g4f_base_url: str = ""
    local_model_path: str = ""
    local_threads: int = Field(2, ge=1, le=256)
    local_max_concurrent: int = Field(2, ge=1, le=64)
    local_max_queue: int = Field(16, ge=0, le=10000)
    request_timeout: float = Field(30.0, gt=0, le=3600)
    max_inflight: int = Field(1000, ge=1)
    thread_pool_size: int = Field(32, ge=1, le=1024)
    loop_max_tasks: int = Field(5000, ge=1)
    upstream_max_connections: int = Field(1000, ge=1)
    retry_attempts: int = Field(3, ge=1, le=10)
    retry_backoff: float = Field(0.25, ge=0)
    database_url: str = ""
    data_dir: str = "./data"
    db_pool_min: int = Field(2, ge=0)
    db_pool_max: int = Field(20, ge=1)
    redis_url: str = ""
    cache_ttl: float = Field(300, ge=0)
    cache_max_entries: int = Field(1024, ge=0)
    rate_limit_chat: str = "20 per minute"
    rate_limit_enabled: bool = True
    trusted_proxy_hops: int = Field(0, ge=0, le=10)
    api_keys: list[str] = Field(default_factory=list)
    admin_key: str = ""
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_message_chars: int = Field(8000, ge=1)
    max_messages: int = Field(50, ge=1)
    stream_heartbeat: float = Field(15.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_bodies: bool = False
    web_concurrency: int = Field(1, ge=1)

    @field_validator("allowed_models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> list[str]:
        return _split(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rate_limit_chat")
    @classmethod
    def _limit_syntax(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError("expected a limit like '20 per minute' or '5/second;100/hour'") from exc
        return value

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, *, dotenv: bool = True) -> Settings:
        """Build settings from `.env`, the environment and overrides; raise SettingsError when invalid."""
        if dotenv:
            load_dotenv(override=False)
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = os.environ.get(name.upper())
            if env is not None and env != "":
                values[name] = env
        values.update({k.lower(): v for k, v in (overrides or {}).items()})
        if "web_concurrency" not in values:
            values["web_concurrency"] = os.environ.get("WEB_CONCURRENCY") or 1
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = str(err["loc"][0]).upper() if err["loc"] else "?"
                problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None

    @property
    def auth_enabled(self) -> bool:
        """Tell whether API keys are required."""
        return bool(self.api_keys)
