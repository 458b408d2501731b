"""Settings from the environment: TREEPO_* names, plain REDIS_URL, lists, and clear refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from treepo.service.config import Settings


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6380/1")
    monkeypatch.setenv("TREEPO_SGLANG_URLS", "http://a:30000, http://b:30000")
    monkeypatch.setenv("TREEPO_ENGINE", "sglang")
    monkeypatch.setenv("TREEPO_API_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("TREEPO_MAX_QUEUE_DEPTH", "5")
    settings = Settings()
    assert settings.redis_url == "redis://elsewhere:6380/1"
    assert settings.sglang_urls == ["http://a:30000", "http://b:30000"]
    assert settings.engine == "sglang" and settings.max_queue_depth == 5
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(settings)
    monkeypatch.setenv("TREEPO_REDIS_URL", "redis://preferred:6379/0")
    assert Settings().redis_url == "redis://preferred:6379/0"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("engine", "vllm", "embedded"),
        ("max_queue_depth", 0, "greater than or equal to 1"),
        ("key_prefix", "treepo:", "must not end with ':'"),
        ("port", 70000, "less than or equal to 65535"),
    ],
)
def test_bad_settings_say_what_is_wrong(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})
