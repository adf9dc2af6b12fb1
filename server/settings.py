"""Server settings: command-line flags and SOFTDIMO_* environment variables, defaults stated once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from softdimo.shipped import SERVED, SHIPPED_WEIGHTS
from softdimo.runtime import RuntimeSettings


# Images per piece of background TTEO work where --refine-chunk is unset, by device type (absent: a whole batch).
# On a CPU an interactive batch waits for the piece in progress: with the default model, one image's share of a TTEO
# step takes a few tens of ms there, a whole batch's hundreds. A GPU runs a batch's step in milliseconds, and
# splitting it would only cost throughput.
DEVICE_REFINE_CHUNK: dict[str, int] = {"cpu": 1}


def default_weights() -> list[str]:
    """The shipped default bundles: the one-step models once trained, and the teachers."""
    return [str(SHIPPED_WEIGHTS / name) for name in SERVED if (SHIPPED_WEIGHTS / name).is_dir()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTDIMO_", frozen=True)

    host: str = Field(
        "127.0.0.1", description="bind address: loopback unless asked; put a proxy in front for anything public"
    )
    port: int = Field(8000, ge=0, le=65535)
    weights: Annotated[list[str], NoDecode] = Field(
        default_factory=default_weights, description="bundle folders to serve; the first is the default model"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=1024, description="images per executed batch")
    # How models run (softdimo/runtime.py, where the defaults are stated): all off unless asked.
    precision: Literal["fp32", "bf16", "int8"] = Field(
        RuntimeSettings.precision,
        description="bf16: models run under bfloat16 autocast; int8: int8 Linear weights for /generate (CPU)",
    )
    compile: bool = Field(
        RuntimeSettings.compile,
        description="torch.compile each model, batches padded to power-of-two sizes (CUDA graphs)",
    )
    pin_memory: bool = Field(
        RuntimeSettings.pin_memory, description="copy images back to the host through pinned memory (CUDA)"
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="the longest a batch waits for company after its first request (not at all when arrivals are sparse)",
    )
    refine_max_wait_ms: float = Field(
        50.0, ge=0, description="the same for /refine, whose batches compute for seconds: always waited"
    )
    max_queue: int = Field(256, ge=1, description="queued images per model and endpoint before 429")
    request_timeout_s: float = Field(60.0, gt=0, description="a request not served by then gets 504")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long queued and running work may take to finish"
    )
    api_key: str | None = Field(
        None, description="when set, requests need `Authorization: Bearer <key>` (environment only)"
    )
    # Paths answered without the key: probes, the scrape target, the API description and the playground page
    # (static files that hold no secrets; the page sends the key the user types with every API call it makes).
    auth_exempt_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "/",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/docs",
            "/docs/oauth2-redirect",
            "/redoc",
        ],
        description="paths answered without the API key",
    )
    playground: bool = Field(True, description="serve the browser playground at GET /")
    # Cost of a request = images x steps x best_of, where steps are the teacher's sampling steps or the TTEO
    # steps (the model's default when absent) and 1 for a one-step /generate. 4096 admits 16 images x 200
    # TTEO steps (3200) or 16 images x 64 teacher steps (1024), but not 16 x 200 x best_of 16.
    max_request_cost: int = Field(4096, ge=1, description="images x steps x best_of allowed in one request")
    max_queue_cost: int = Field(
        16384, ge=1, description="queued cost per model and endpoint before 429 (four of the largest requests)"
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="request bodies above this get 413 before any JSON is parsed"
    )
    # Jobs (POST /v1/jobs): durable, run by whichever process sharing the store claims them first.
    job_store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="where jobs live: one SQLite file, or a Redis server"
    )
    job_db_path: str = Field("softdimo-jobs.sqlite3", description="the SQLite file of job_store sqlite (WAL mode)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the Redis server of job_store redis")
    job_concurrency: int = Field(4, ge=1, le=256, description="jobs this process runs at once (they batch together)")
    job_lease_s: float = Field(
        30.0,
        gt=0,
        description="a running job's claim, renewed while it runs; a job whose process died runs again after it",
    )
    job_max_attempts: int = Field(
        3, ge=1, description="runs a job gets: one whose process died that many times while running it then fails"
    )
    job_result_ttl_s: float = Field(86400.0, gt=0, description="how long a finished job and its result are kept")
    max_queued_jobs_per_key: int = Field(100, ge=1, description="queued jobs per API key before 429 (with an API key)")
    webhook_secret: str | None = Field(None, description="signs webhook calls, HMAC-SHA256 (environment only)")
    webhook_allow_private: bool = Field(False, description="let webhooks call loopback and private addresses")
    webhook_attempts: int = Field(5, ge=1, le=20, description="webhook deliveries tried before giving up")
    webhook_backoff_s: float = Field(1.0, gt=0, description="wait before the first retry, doubling after each")
    webhook_timeout_s: float = Field(10.0, gt=0, description="the longest one webhook delivery may take")
    interactive_burst: int = Field(
        4, ge=1, description="interactive batches run ahead of waiting job and /refine work before one of those runs"
    )
    refine_chunk: int | None = Field(
        None,
        ge=1,
        description="images per piece of /refine and job TTEO work; waiting interactive batches run between pieces",
    )
    log_level: str = "info"

    def runtime(self) -> RuntimeSettings:
        return RuntimeSettings(precision=self.precision, compile=self.compile, pin_memory=self.pin_memory)

    def refine_chunk_on(self, device: str) -> int | None:
        """Images per piece of background TTEO work on a `device` type: as set, else DEVICE_REFINE_CHUNK's (None: a
        whole batch)."""
        return self.refine_chunk if self.refine_chunk is not None else DEVICE_REFINE_CHUNK.get(device)

    @field_validator("weights", "auth_exempt_paths", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [v for v in (p.strip() for p in value.split(",")) if v]
        return value

    @field_validator("api_key", "webhook_secret")
    @classmethod
    def _usable_key(cls, value, info: ValidationInfo):
        if value is None:
            return None
        # A key read from a file often ends in a newline, which no Authorization header can carry.
        value = value.strip()
        if not value:
            variable = "SOFTDIMO_" + info.field_name.upper()
            raise ValueError(f"{info.field_name} is empty: set a key, or unset {variable} to serve without one")
        return value

    @model_validator(mode="after")
    def _queue_holds_a_request(self):
        # Otherwise the largest admissible request could never be queued and would get 429 forever.
        if self.max_queue_cost < self.max_request_cost:
            raise ValueError(
                f"max_queue_cost ({self.max_queue_cost}) must be at least max_request_cost ({self.max_request_cost})"
            )
        return self


def shown_default(name: str) -> str:
    """A setting's default as `softdimo serve --help` and README's flag table state it."""
    field = Settings.model_fields[name]
    if field.default_factory is default_weights:
        return "the shipped bundles"
    if name == "refine_chunk":
        return ", ".join(f"{size} on {device}" for device, size in DEVICE_REFINE_CHUNK.items()) + ", else whole batches"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value)
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
