"""Configuration: one pydantic-settings class read from ``SIDECAR_*`` environment variables.

:func:`load_settings` turns any validation problem into a one-line :class:`ConfigError` naming the
variable; secret values are never echoed.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from sidecar.addresses import EndpointUrl, is_loopback
from sidecar.errors import ConfigError
from sidecar.jobs_config import HookUrl, HttpUrl, ManifestTemplate, WebhookEvents, check_jobs, shown_url
from sidecar.object_config import Disposition, HeaderValue, KeyTemplate, PodId, RouteSpec, check_objects, parse_metadata
from sidecar.sizes import parse_bytes, parse_floor

ENV_PREFIX = "SIDECAR_"
SECRETS_DIR_VAR = "SIDECAR_SECRETS_DIR"
DEFAULT_EXTENSIONS = (
    "png,jpg,jpeg,webp,gif,mp4,webm,mov,mkv,flac,mp3,opus,wav,glb,svg,latent"
)
MIB = 1024 * 1024

CommaList = Annotated[list[str], NoDecode]
MIN_TOKEN_CHARS = 16
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the daemon can be told. Each field is ``SIDECAR_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Where files come from and where the journal lives.
    watch_dir: Path = Path("/workspace/outputs")
    state_dir: Path = Path("/workspace/.sidecar")

    # Where files go.
    bucket: str = ""
    r2_account_id: str = ""
    endpoint_url: EndpointUrl = ""
    region: str = "auto"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    key_template: KeyTemplate = "{pod_id}/{relpath}"
    key_escape: Literal["none", "unsafe"] = "none"  # unsafe: %-encode backslashes and Unicode format characters

    # What objects are stored with (sidecar.routing), and per-path rules over it.
    cache_control: HeaderValue = ""
    content_disposition: Disposition = "auto"  # auto: attachment for types that can carry script (SVG, HTML, XML)
    storage_class: str = ""
    metadata: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    routes: list[RouteSpec] = Field(default_factory=list)  # JSON: [{"match": "video/*", ...}, ...]
    pod_id: PodId = Field(default_factory=lambda: os.environ.get("RUNPOD_POD_ID") or socket.gethostname())

    # What to upload.
    extensions: CommaList = Field(default_factory=lambda: DEFAULT_EXTENSIONS.split(","))
    include: CommaList = Field(default_factory=list)
    exclude: CommaList = Field(default_factory=list)

    # How to upload.
    workers: int = Field(default=4, ge=1, le=64)
    multipart_threshold_mb: int = Field(default=64, ge=5, le=5 * 1024)
    part_size_mb: int = Field(default=16, ge=5, le=5 * 1024)
    part_concurrency: int = Field(default=4, ge=1, le=32)
    direct_put: bool = True  # single PUTs over http.client (sidecar.direct_put); false: all through botocore
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=200, ge=1)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=300.0, gt=0)

    # When to upload.
    settle_s: float = Field(default=0.15, ge=0)
    quiet_s: float = Field(default=3.0, gt=0, le=3600)  # no writer evidence: this long without a change
    scan_interval_s: float = Field(default=300.0, gt=0)
    drain_timeout_s: float = Field(default=4.0, ge=0)

    # How to be seen.
    http_host: str = "127.0.0.1"  # another address needs a token (RunPod publishes exposed ports)
    http_port: int = Field(default=9188, ge=0, le=65535)
    http_token: SecretStr | None = None
    http_public_without_token: bool = False  # the explicit, logged opt-out of that rule
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    # What to delete once it is safely stored (all off by default; sidecar.retention).
    delete_after_s: float | None = Field(default=None, ge=0)
    disk_min_free: str = ""  # a size or a percentage of the watched filesystem
    keep_max_bytes: str = ""  # a size
    retention_include: CommaList = Field(default_factory=list)
    retention_exclude: CommaList = Field(default_factory=list)
    retention_dry_run: bool = False
    retention_rate: float = Field(default=20.0, gt=0, le=10_000)  # deletions per second at most

    # Jobs: which ComfyUI prompt wrote each file, manifests, URLs, webhooks (sidecar.jobs); "" turns it off.
    comfyui_url: HttpUrl = "http://127.0.0.1:8188"
    comfyui_poll_s: float = Field(default=0.5, ge=0.05, le=60)  # without the websocket, while a prompt runs
    comfyui_websocket: bool = True  # ComfyUI's status broadcasts trigger the polls instead
    prompt_wait_s: float = Field(default=300.0, ge=0, le=86_400)  # {prompt_id} in a key: hold a file this long
    manifest_key: ManifestTemplate = "{pod_id}/_jobs/{prompt_id}.json"
    public_base_url: HttpUrl = ""
    presign_ttl_s: int = Field(default=0, ge=0, le=604_800)  # R2 and S3 cap presigned URLs at 7 days
    webhook_url: HookUrl = ""
    webhook_secret: SecretStr | None = None
    webhook_events: WebhookEvents = Field(default_factory=lambda: ["job"])  # job, file

    @field_validator("delete_after_s", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("disk_min_free")
    @classmethod
    def _check_floor(cls, value: str) -> str:
        if value.strip():
            parse_floor(value)
        return value.strip()

    @field_validator("keep_max_bytes")
    @classmethod
    def _check_size(cls, value: str) -> str:
        if value.strip() and parse_bytes(value) <= 0:
            raise ValueError("must be more than 0 bytes")
        return value.strip()

    @field_validator("extensions", "include", "exclude", "retention_include", "retention_exclude", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        return [ext.lower().lstrip(".") for ext in value]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("metadata", mode="before")
    @classmethod
    def _parse_metadata(cls, value: Any) -> Any:
        return parse_metadata(_split_commas(value)) if isinstance(value, str) else value

    @field_validator("r2_account_id")
    @classmethod
    def _check_account(cls, value: str) -> str:
        if value and not _LABEL.fullmatch(value):
            raise ValueError("must be the account id from the Cloudflare dashboard (letters, digits, '-')")
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise ValueError("must be a region name like 'auto' (R2) or 'us-east-1' (lower case, digits, '-')")
        return value

    @model_validator(mode="after")
    def _check_http(self) -> Settings:
        token = self.http_token.get_secret_value() if self.http_token is not None else None
        if token is not None and (len(token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in token)):
            raise ValueError(f"SIDECAR_HTTP_TOKEN: must be one word of at least {MIN_TOKEN_CHARS} characters "
                             "(e.g. from `openssl rand -hex 16`)")
        if token is None and not is_loopback(self.http_host) and not self.http_public_without_token:
            raise ValueError(f"SIDECAR_HTTP_HOST: {self.http_host} without SIDECAR_HTTP_TOKEN would show /status "
                             "(bucket, keys, file names) and /metrics to anyone who reaches the port; set a "
                             "token, or SIDECAR_HTTP_PUBLIC_WITHOUT_TOKEN=true to accept that")
        return self

    @model_validator(mode="after")
    def _check_endpoint(self) -> Settings:
        if self.r2_account_id and self.endpoint_url:
            raise ValueError("set SIDECAR_R2_ACCOUNT_ID or SIDECAR_ENDPOINT_URL, not both")
        return self

    @model_validator(mode="after")
    def _check_objects(self) -> Settings:
        check_objects(self, r2=self.is_r2)
        check_jobs(self)
        return self

    @property
    def is_r2(self) -> bool:
        """The store is Cloudflare R2 (by account id or an R2 endpoint URL)."""
        return bool(self.r2_account_id) or ".r2.cloudflarestorage.com" in self.endpoint_url

    @property
    def resolved_endpoint(self) -> str | None:
        """The S3 endpoint URL: R2's from the account id, the explicit URL, or None for AWS itself."""
        if self.r2_account_id:
            return f"https://{self.r2_account_id}.r2.cloudflarestorage.com"
        return self.endpoint_url or None

    @property
    def multipart_threshold(self) -> int:
        return self.multipart_threshold_mb * MIB

    @property
    def part_size(self) -> int:
        return self.part_size_mb * MIB

    @property
    def retention_on(self) -> bool:
        return self.delete_after_s is not None or bool(self.disk_min_free) or bool(self.keep_max_bytes)

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, every secret replaced by ``'**********'``."""
        data: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "**********"
            elif isinstance(value, Path):
                value = str(value)
            elif name == "webhook_url" and value:
                value = shown_url(value)
            elif name == "routes":
                value = [route.model_dump(exclude_none=True) for route in value]
            data[name] = value
        return data

    def require_bucket(self) -> None:
        """Raise :class:`ConfigError` unless a bucket and where it lives are configured (run, scan, check).

        A bucket alone would silently mean AWS S3; that has to be asked for, with its endpoint URL.
        """
        if not self.bucket:
            raise ConfigError("SIDECAR_BUCKET: required (the bucket to upload into)")
        if not self.resolved_endpoint:
            raise ConfigError("SIDECAR_R2_ACCOUNT_ID: required with SIDECAR_BUCKET (or SIDECAR_ENDPOINT_URL for "
                              "another S3 store; for AWS itself https://s3.<region>.amazonaws.com)")


SECRET_FIELDS = frozenset(
    name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)
)
UNECHOED = SECRET_FIELDS | {"endpoint_url", "webhook_url"}  # a URL may carry user:password@ or a token


def _format_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err.get("loc", ()) if not str(part).isdigit()]
    name = loc[0] if loc else ""
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if not name:
        return message if message.startswith(ENV_PREFIX) else f"configuration: {message}"
    variable = f"{ENV_PREFIX}{name.upper()}"
    shown = ""
    if name not in UNECHOED and "input" in err and isinstance(err["input"], str | int | float):
        shown = f" (got {str(err['input'])[:60]!r})"
    return f"{variable}: {message}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (and ``overrides``); raise ConfigError on any problem.

    ``SIDECAR_SECRETS_DIR`` names a folder of files, one per secret field, named like its variable in
    lower case (``sidecar_secret_access_key``): how the image hands the credentials to the sidecar alone
    (entrypoint.sh). An environment variable of the same name wins over the file.
    """
    secrets_dir = os.environ.get(SECRETS_DIR_VAR)
    if secrets_dir:
        if not os.path.isdir(secrets_dir) or not os.access(secrets_dir, os.R_OK | os.X_OK):
            raise ConfigError(f"{SECRETS_DIR_VAR}: {secrets_dir} is not a folder this user can read")
        overrides.setdefault("_secrets_dir", secrets_dir)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    except SettingsError as exc:  # a value that must be JSON (SIDECAR_ROUTES) and is not
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "configuration"
        raise ConfigError(f"{name}: is not valid JSON (e.g. [{{\"match\": \"video/*\", \"cache_control\": "
                          "\"public, max-age=31536000\"}])") from None
