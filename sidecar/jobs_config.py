"""Checks of the job settings (ComfyUI's URL, the manifest key, URLs, the webhook); called by
:mod:`sidecar.config`'s validators, each raising ValueError with a message that follows the variable's name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator
from pydantic_settings import NoDecode

from sidecar.addresses import check_url
from sidecar.object_config import check_key_shape

if TYPE_CHECKING:
    from sidecar.config import Settings

MANIFEST_FIELDS = ("pod_id", "prompt_id")
MIN_WEBHOOK_SECRET_CHARS = 16


def shown_url(value: str) -> str:
    """A URL as configuration views show it: scheme and host only (a path or query may hold a token)."""
    parts = urlsplit(value)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


def check_manifest_template(value: str) -> str:
    if not value:
        return value
    try:
        sample = value.format(pod_id="pod", prompt_id="0f6e1b2a-prompt")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"unknown or malformed placeholder {exc}; allowed: {{pod_id}}, {{prompt_id}}") from None
    if "{prompt_id}" not in value:
        raise ValueError("must contain {prompt_id}, or every job's manifest gets the same key")
    check_key_shape(sample, "gives keys")
    return value


def check_jobs(settings: Settings) -> None:
    """Settings that only make sense together."""
    uses_prompt = "{prompt_id}" in settings.key_template or any(
        "{prompt_id}" in (route.key_template or "") for route in settings.routes)
    if uses_prompt and not settings.comfyui_url:
        raise ValueError("SIDECAR_KEY_TEMPLATE: {prompt_id} needs SIDECAR_COMFYUI_URL (ComfyUI names the prompts)")
    if settings.webhook_url and not settings.comfyui_url:
        raise ValueError("SIDECAR_WEBHOOK_URL: webhooks report jobs, which need SIDECAR_COMFYUI_URL")
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret is not None else ""
    if settings.webhook_url and len(secret) < MIN_WEBHOOK_SECRET_CHARS:
        raise ValueError(f"SIDECAR_WEBHOOK_SECRET: required with SIDECAR_WEBHOOK_URL, at least "
                         f"{MIN_WEBHOOK_SECRET_CHARS} characters (e.g. whsec_ and base64 of 24 random bytes)")
    if settings.public_base_url and settings.presign_ttl_s:
        raise ValueError("set SIDECAR_PUBLIC_BASE_URL or SIDECAR_PRESIGN_TTL_S, not both")


def check_events(value: list[str]) -> list[str]:
    if not value or not set(value) <= {"job", "file"}:
        raise ValueError("a comma list of job (one event per finished job) and file (one per stored file)")
    return value


def _commas(value: Any) -> Any:
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


HttpUrl = Annotated[str, AfterValidator(lambda value: check_url(value.strip()))]
HookUrl = Annotated[str, AfterValidator(lambda value: check_url(value.strip(), query=True))]
ManifestTemplate = Annotated[str, AfterValidator(lambda value: check_manifest_template(value.strip()))]
WebhookEvents = Annotated[list[str], NoDecode, BeforeValidator(_commas), AfterValidator(check_events)]
