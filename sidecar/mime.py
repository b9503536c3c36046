"""Content-Type from a file name, with the ComfyUI formats that :mod:`mimetypes` does not know."""

from __future__ import annotations

import mimetypes

EXTRA = {
    "webp": "image/webp", "webm": "video/webm", "mkv": "video/x-matroska", "mov": "video/quicktime",
    "flac": "audio/flac", "opus": "audio/opus", "mp3": "audio/mpeg", "wav": "audio/wav",
    "glb": "model/gltf-binary", "svg": "image/svg+xml", "latent": "application/octet-stream",
    "safetensors": "application/octet-stream",
}


def content_type(name: str) -> str:
    """The MIME type to store with an object named ``name``."""
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    return EXTRA.get(ext) or mimetypes.guess_type(f"x.{ext}")[0] or "application/octet-stream"
