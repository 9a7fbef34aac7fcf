"""Service settings: environment variables with the ``BDS_`` prefix (or a ``.env`` file).

The embedded default needs none of them: SQLite job table, SQLite queue and artifacts under ``BDS_DATA_DIR``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.signing import secret_key

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Everything the API and the workers read from their environment."""

    model_config = SettingsConfigDict(env_prefix="BDS_", env_file=".env", extra="ignore", frozen=True)

    data_dir: Path = Field(default=Path("bds-data"), description="uploads, artifacts and the embedded databases")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL of the job table")
    queue_url: str | None = Field(default=None, description="sqlite:///FILE (embedded) or redis://HOST:PORT/DB")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="comma-separated API keys accepted as 'Authorization: Bearer KEY'"
    )
    auth_disabled: bool = Field(default=False, description="accept requests without a key (never in production)")
    max_upload_mb: float = Field(default=512, gt=0, description="cap on each uploaded file, in MiB")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N for the workers")
    allow_torchscript: bool = Field(default=False, description="let clients set trust_code (TorchScript runs code)")
    scan_time_limit_s: float = Field(default=3600, gt=0, description="a running scan is stopped after this")
    heartbeat_interval_s: float = Field(default=5, gt=0)
    heartbeat_timeout_s: float = Field(default=60, gt=0, description="a running scan whose heartbeat is older is lost")
    reaper_interval_s: float = Field(default=10, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="runs of one scan before it fails with worker_lost")
    worker_threads: int = Field(default=1, ge=1, description="scans one worker process runs at a time")
    torch_threads: int | None = Field(default=None, ge=1, description="intra-op threads per scan (default: torch's)")
    webhook_secret: SecretStr | None = Field(
        default=None, description="'whsec_' + base64: signs completion webhooks; callbacks are refused without it"
    )
    webhook_max_attempts: int = Field(default=6, ge=1, description="deliveries tried per webhook")
    webhook_retry_delay_s: float = Field(default=2.0, ge=0, description="first retry delay; doubles each retry")
    log_json: bool = True
    log_level: str = "INFO"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret_key(value.get_secret_value())
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.sqlite3').resolve()}"

    @property
    def resolved_queue_url(self) -> str:
        return self.queue_url or f"sqlite:///{(self.data_dir / 'queue.sqlite3').resolve()}"

    @property
    def scans_dir(self) -> Path:
        return self.data_dir / "scans"


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()
