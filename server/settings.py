"""Server settings: command-line flags and SOFTDIMO_* environment variables, defaults stated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_BUNDLES = ("shapes-teacher-text", "shapes-teacher-class")


def default_weights() -> list[str]:
    """The shipped default bundles: the one-step models once trained, and the teachers."""
    return [str(SHIPPED_WEIGHTS / name) for name in DEFAULT_BUNDLES if (SHIPPED_WEIGHTS / name).is_dir()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTDIMO_", frozen=True)

    host: str = "127.0.0.1"  # loopback unless asked: put a proxy in front for anything public
    port: int = Field(8000, ge=0, le=65535)
    weights: Annotated[list[str], NoDecode] = Field(default_factory=default_weights)  # bundle folders; the first is the default model
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=1024)  # images per executed batch
    max_wait_ms: float = Field(5.0, ge=0)  # how long a batch may wait for company after its first request
    max_queue: int = Field(256, ge=1)  # queued images per model and endpoint before 429
    request_timeout_s: float = Field(60.0, gt=0)  # a request not served by then gets 504
    drain_timeout_s: float = Field(30.0, ge=0)  # on SIGTERM, how long queued and running work may take to finish
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <key>`
    log_level: str = "info"

    @field_validator("weights", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [v for v in (p.strip() for p in value.split(",")) if v]
        return value
