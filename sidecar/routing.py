"""Which key template and headers a file gets: the first ``SIDECAR_ROUTES`` rule whose glob matches its
relative path, else the global settings. A rule's unset fields fall back to the global ones; its metadata
is merged over the global metadata.

``Content-Disposition`` ``auto`` (the default) sends ``attachment`` for types that can carry script (SVG,
HTML, XML): served inline from a public bucket on your own domain, an SVG runs its scripts there.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from sidecar.keys import KeyBuilder, path_text
from sidecar.mime import content_type
from sidecar.store import ObjectHeaders

if TYPE_CHECKING:
    from sidecar.config import Settings

SCRIPT_TYPES = frozenset({"image/svg+xml", "text/html", "application/xhtml+xml", "text/xml", "application/xml",
                          "text/javascript", "application/javascript"})
UNIQUE_FIELDS = ("{relpath}", "{md5}")


@dataclass(frozen=True, slots=True)
class Route:
    match: str  # "" for the default
    keys: KeyBuilder
    cache_control: str = ""
    content_disposition: str = "auto"
    storage_class: str = ""
    metadata: tuple[tuple[str, str], ...] = ()

    def headers(self, rel: str) -> ObjectHeaders:
        ctype = content_type(rel)
        disposition = self.content_disposition
        if disposition == "auto":
            disposition = "attachment" if ctype in SCRIPT_TYPES else ""
        elif disposition == "none":
            disposition = ""
        return ObjectHeaders(ctype, self.cache_control, disposition, self.storage_class, self.metadata)

    def describe(self) -> dict[str, Any]:
        return {"match": self.match or "(everything else)", "key_template": self.keys.template,
                "cache_control": self.cache_control or None, "content_disposition": self.content_disposition,
                "storage_class": self.storage_class or None, "metadata": dict(self.metadata)}


class Router:
    """Routes in order, then the default."""

    def __init__(self, routes: list[Route], default: Route) -> None:
        self.routes = routes
        self.default = default

    @classmethod
    def plain(cls, keys: KeyBuilder) -> Router:
        """One template for everything and no extra headers (tests, tools)."""
        return cls([], Route("", keys))

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        escape = settings.key_escape == "unsafe"
        default = Route("", KeyBuilder(settings.key_template, settings.pod_id, escape_unsafe=escape),
                        settings.cache_control, settings.content_disposition, settings.storage_class,
                        tuple(sorted(settings.metadata.items())))
        routes = [
            Route(
                spec.match,
                KeyBuilder(spec.key_template or settings.key_template, settings.pod_id, escape_unsafe=escape),
                settings.cache_control if spec.cache_control is None else spec.cache_control,
                settings.content_disposition if spec.content_disposition is None else spec.content_disposition,
                settings.storage_class if spec.storage_class is None else spec.storage_class,
                tuple(sorted({**settings.metadata, **{k.lower(): v for k, v in spec.metadata.items()}}.items())),
            )
            for spec in settings.routes
        ]
        return cls(routes, default)

    def route(self, relpath: bytes) -> Route:
        rel = path_text(relpath)
        return next((r for r in self.routes if fnmatchcase(rel, r.match)), self.default)

    def describe(self) -> list[dict[str, Any]]:
        return [r.describe() for r in (*self.routes, self.default)]

    def warnings(self) -> list[str]:
        """Rule sets that could give two different files one key (the second then gets a variant key)."""
        out = []
        every = [*self.routes, self.default]
        for n, route in enumerate(every):
            name = f"route {n} ({route.match})" if route.match else "the default route"
            if not any(field in route.keys.template for field in UNIQUE_FIELDS):
                out.append(f"{name}: template {route.keys.template!r} has neither {{relpath}} nor {{md5}}: two "
                           "files with one name in different folders map to one key")
        templates = sorted({r.keys.template for r in every})
        for i, first in enumerate(templates):
            for second in templates[i + 1:]:
                a, b = _literal_head(first), _literal_head(second)
                if a.startswith(b) or b.startswith(a):
                    out.append(f"templates {first!r} and {second!r} start alike: a file of one route may get the "
                               "key of a file of the other")
        return out


def _literal_head(template: str) -> str:
    """The text before the first placeholder other than {pod_id} (which is fixed for a pod)."""
    return template.replace("{pod_id}", "\0").split("{", 1)[0]
