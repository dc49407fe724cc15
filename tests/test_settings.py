"""Settings.load: bad values are refused by name, lists parse, and .env.example documents them all."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from chat.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
NAMES = [name.upper() for name in Settings.model_fields]
# `NAME=value`, commented out or not; comment prose never has an upper-case word right before `=`.
EXAMPLE_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
# Unset in the example because the running code computes them (gunicorn counts the cores).
COMPUTED = {"WEB_CONCURRENCY"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Run each test without any setting in the environment (and undo what a .env adds)."""
    for name in NAMES:
        # setenv first so that teardown removes whatever a test or load_dotenv sets.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def load(**env: str) -> Settings:
    for name, value in env.items():
        os.environ[name] = value  # clean_env removes them after the test
    return Settings.load(dotenv=False)


def example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        match = EXAMPLE_LINE.match(line.strip())
        if match:
            name, value = match.groups()
            assert name not in values, f"{name} is listed twice in .env.example"
            values[name] = value.strip()
    return values


# -- bad values ------------------------------------------------------------------

BAD = [("PORT", "abc"), ("PORT", "0"), ("PORT", "70000"), ("REQUEST_TIMEOUT", "-1"),
       ("REQUEST_TIMEOUT", "0"), ("REQUEST_TIMEOUT", "soon"), ("RATE_LIMIT_CHAT", "lots"),
       ("RATE_LIMIT_CHAT", "20 per fortnight"), ("LLM_PROVIDER", "nope"), ("LOG_LEVEL", "LOUD"),
       ("MAX_INFLIGHT", "0"), ("THREAD_POOL_SIZE", "-3"), ("TRUSTED_PROXY_HOPS", "-1"),
       ("LOG_BODIES", "maybe"), ("RATE_LIMIT_ENABLED", "perhaps"), ("MAX_BODY_BYTES", "10"),
       ("MAX_MESSAGES", "0"), ("CACHE_TTL", "-5"), ("RETRY_ATTEMPTS", "0")]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_environment_value_is_refused_by_name(clean_env: pytest.MonkeyPatch, name: str,
                                                   value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        Settings.load(dotenv=False)
    text = str(raised.value)
    assert f"{name}=" in text
    assert repr(value) in text
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name,value", BAD[:6], ids=[f"{n}={v}" for n, v in BAD[:6]])
def test_bad_override_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=rf"\b{name}="):
        Settings.load({name.lower(): value}, dotenv=False)


def test_every_bad_value_is_named_at_once(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PORT", "abc")
    clean_env.setenv("LLM_PROVIDER", "nope")
    with pytest.raises(SettingsError) as raised:
        Settings.load({"request_timeout": -1}, dotenv=False)
    assert {"PORT=", "LLM_PROVIDER=", "REQUEST_TIMEOUT="} <= set(re.findall(r"[A-Z_]+=", str(raised.value)))


def test_unknown_override_is_refused() -> None:
    with pytest.raises(SettingsError, match="REQUEST_TIMEOT="):
        Settings.load({"request_timeot": 5}, dotenv=False)


def test_create_app_refuses_bad_settings() -> None:
    from chat import create_app
    with pytest.raises(SettingsError, match="PORT="):
        create_app({"port": "abc"})


# -- good values -----------------------------------------------------------------------

def test_defaults() -> None:
    settings = Settings.load(dotenv=False)
    assert settings.host == "0.0.0.0" and settings.port == 4343
    assert settings.llm_provider == "g4f" and settings.llm_model == "gpt-4o-mini"
    assert settings.request_timeout == 30 and settings.max_inflight == 1000
    assert settings.thread_pool_size == 32
    assert settings.rate_limit_chat == "20 per minute" and settings.trusted_proxy_hops == 0
    assert settings.cache_ttl == 300 and settings.cache_max_entries == 1024
    assert (settings.max_body_bytes, settings.max_message_chars, settings.max_messages) == (1048576, 8000, 50)
    assert settings.api_keys == [] and settings.auth_enabled is False and settings.admin_key == ""
    assert settings.cors_origins == ["*"]
    assert settings.log_level == "INFO" and settings.log_bodies is False
    assert settings.web_concurrency == 1


def test_environment_values_are_typed() -> None:
    settings = load(PORT="8080", REQUEST_TIMEOUT="2.5", LOG_LEVEL="debug", LOG_BODIES="true",
                    RATE_LIMIT_CHAT="5/second;100/hour", LLM_PROVIDER="openai", WEB_CONCURRENCY="4")
    assert settings.port == 8080
    assert settings.request_timeout == 2.5
    assert settings.log_level == "DEBUG"
    assert settings.log_bodies is True
    assert settings.rate_limit_chat == "5/second;100/hour"
    assert settings.llm_provider == "openai"
    assert settings.web_concurrency == 4


def test_empty_environment_value_means_unset() -> None:
    assert load(PORT="", API_KEYS="", REQUEST_TIMEOUT="") == Settings.load(dotenv=False)


def test_overrides_win_over_the_environment_and_case_does_not_matter(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PORT", "8080")
    settings = Settings.load({"PORT": 9090, "llm_model": "gpt-4o"}, dotenv=False)
    assert settings.port == 9090
    assert settings.llm_model == "gpt-4o"


@pytest.mark.parametrize("name", ["API_KEYS", "CORS_ORIGINS", "ALLOWED_MODELS"])
@pytest.mark.parametrize("raw,parsed", [
    ("one", ["one"]),
    ("one,two", ["one", "two"]),
    (" one , two ,, three ,", ["one", "two", "three"]),
    (",", []),
])
def test_comma_lists_parse(name: str, raw: str, parsed: list[str]) -> None:
    field = name.lower()
    assert getattr(load(**{name: raw}), field) == parsed
    assert getattr(Settings.load({field: raw}, dotenv=False), field) == parsed


def test_lists_may_be_given_as_lists_and_keys_turn_auth_on() -> None:
    settings = Settings.load({"api_keys": ["k1", "k2"], "cors_origins": ["https://a.example"]}, dotenv=False)
    assert settings.api_keys == ["k1", "k2"]
    assert settings.auth_enabled is True
    assert settings.cors_origins == ["https://a.example"]
    assert Settings.load({"api_keys": "k1,k2"}, dotenv=False).api_keys == ["k1", "k2"]


def test_settings_are_frozen() -> None:
    settings = Settings.load(dotenv=False)
    with pytest.raises(Exception):
        settings.port = 1  # type: ignore[misc]


# -- .env.example --------------------------------------------------------------------

def test_env_example_lists_every_setting() -> None:
    listed = example()
    missing = [name for name in NAMES if name not in listed]
    assert not missing, f".env.example lacks {missing}"


def test_env_example_shows_the_defaults_of_the_code() -> None:
    defaults = Settings.load(dotenv=False)
    listed = example()
    for name in NAMES:
        value = listed[name]
        if value == "":
            assert name in COMPUTED or not getattr(defaults, name.lower()), \
                f"{name} is empty in .env.example but defaults to {getattr(defaults, name.lower())!r}"
        else:
            shown = Settings.load({name.lower(): value}, dotenv=False)
            assert getattr(shown, name.lower()) == getattr(defaults, name.lower()), \
                f"{name}={value} in .env.example, but the code defaults to {getattr(defaults, name.lower())!r}"
    # Uncommenting the whole file changes nothing.
    values = {name.lower(): value for name, value in listed.items() if value and name in NAMES}
    assert Settings.load(values, dotenv=False) == defaults


def test_env_example_explains_each_setting() -> None:
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("# ---") for line in lines), "settings are grouped under headers"
    for i, line in enumerate(lines):
        match = EXAMPLE_LINE.match(line)
        if not match:
            continue
        # Walk up over the settings this one is grouped with to the comment that explains them.
        j = i - 1
        while j >= 0 and EXAMPLE_LINE.match(lines[j]):
            j -= 1
        assert j >= 0 and lines[j].startswith("# ") and not lines[j].startswith("# ---"), \
            f"{match.group(1)} has no comment of its own"
