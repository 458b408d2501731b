"""Service settings: one pydantic-settings model read from `TREEPO_*` variables (and `REDIS_URL`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from treepo.client.constants import DEFAULT_GROUP, DEFAULT_PREFIX

EngineKind = Literal["embedded", "sglang", "scripted"]


class Settings(BaseSettings):
    """Everything `treepo serve` can be told; every field is also `TREEPO_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="TREEPO_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    engine: EngineKind = Field(default="embedded", description="Inference backend.")
    model_path: str | None = Field(
        default=None,
        description="Local HF model directory (tokenizer + weights); null = the shipped tiny model.",
    )
    device: str = Field(default="cpu", description="Embedded engine device: cpu, cuda, cuda:1...")
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="torch CPU threads of the embedded engine (0 = torch's default). 1 by default: on a "
        "2-core machine the tiny model decodes ~30x slower with 2 intra-op threads (README: Embedded "
        "engine).",
    )
    sglang_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:30000"],
        description="Where generation goes: SGLang workers (prefix-routed) or one sglang-router URL.",
    )
    sglang_admin_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The SGLang workers themselves, for weight pushes, flushes and health (the router has no "
        "weight routes); empty = sglang_urls.",
    )
    sglang_wait_s: float = Field(
        default=600.0, ge=0, description="How long start-up waits for the SGLang workers to answer."
    )
    max_context: int | None = Field(
        default=None,
        ge=2,
        description="Upper bound on prompt + path tokens; null = model config (sglang: and the workers' limits).",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("TREEPO_REDIS_URL", "REDIS_URL", "redis_url"),
    )
    key_prefix: str = Field(default=DEFAULT_PREFIX, min_length=1, description="Redis key namespace.")
    max_queue_depth: int = Field(
        default=10_000, ge=1, description="Unconsumed trees in the stream above which queue requests get 429."
    )
    max_prompts_per_request: int = Field(default=1024, ge=1)
    max_request_tokens: int = Field(
        default=2**24,
        ge=1,
        description="Work bound of one rollout request: prompts x width x tokens per trajectory (413 above).",
    )
    max_request_bytes: int = Field(default=16 * 2**20, ge=1024, description="JSON body limit (413 above).")
    max_upload_bytes: int = Field(default=8 * 2**30, ge=1024, description="Weights upload limit (413 above).")
    weights_dir: Path = Field(
        default=Path("weights"), description="POST /weights paths must lie under it; uploads land in it."
    )
    tree_ttl_s: int = Field(default=3600, ge=1, description="How long GET /trees/{id} keeps a tree.")
    idempotency_ttl_s: int = Field(default=3600, ge=1, description="How long a finished answer is replayed.")
    idempotency_lease_s: int = Field(
        default=60, ge=1, description="An in-progress Idempotency-Key whose owner died frees up after this."
    )
    max_copy_bytes: int = Field(
        default=2**20,
        ge=0,
        description="Trees/answers larger than this get no GET /trees copy or replay body.",
    )
    training_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_GROUP],
        description="Consumer groups whose backlog is the queue depth (others, e.g. a dashboard, do not count).",
    )
    job_lease_s: float = Field(
        default=15.0,
        gt=0,
        description="A queue job whose owner stops renewing its lease is resumed after this.",
    )
    job_ttl_s: int = Field(
        default=24 * 3600, ge=1, description="An unfinishable job record expires after this."
    )
    redis_retry_window_s: float = Field(
        default=60.0,
        ge=0,
        description="How long queue jobs retry Redis writes before leaving them to recovery.",
    )
    failures_retention_s: float = Field(
        default=24 * 3600, gt=0, description="Failure records older than this are trimmed."
    )
    trim_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often trees every training group acknowledged are trimmed from the stream.",
    )
    api_token: SecretStr | None = Field(default=None, description="Bearer token; null = no auth.")
    max_kv_tokens: int = Field(
        default=65_536,
        ge=64,
        description="Embedded engine KV budget in tokens (radix cache + running rows); more waits.",
    )
    max_running_rows: int = Field(
        default=256, ge=1, description="Embedded engine rows decoding at once; more requests wait."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Embedded engine dtype; auto = float32 on CPU, the checkpoint's on CUDA."
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After sent with 429 and 503.")
    swap_wait_s: float = Field(
        default=5.0, ge=0, description="How long a new request waits for a weight swap before 503."
    )
    fleet_poll_s: float = Field(
        default=1.0, gt=0, description="How often a replica looks for weights another replica pushed."
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="Time queued work gets to finish on stop."
    )
    scripted_latency_s: float = Field(
        default=0.0, ge=0, description="Per-call latency of the scripted engine."
    )

    @field_validator("training_groups", mode="before")
    @classmethod
    def _split_groups(cls, value: object) -> object:
        if isinstance(value, str):
            return [group.strip() for group in value.split(",") if group.strip()]
        return value

    @field_validator("sglang_urls", "sglang_admin_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_colon_end(cls, value: str) -> str:
        if value.endswith(":"):
            raise ValueError(f"key_prefix must not end with ':' (got {value!r}); the names add it")
        return value

    def resolved_model_path(self) -> str:
        """The model directory: the configured one, else the shipped tiny model."""
        if self.model_path:
            return self.model_path
        from treepo.service.tinymodel import default_model_path

        return str(default_model_path())
