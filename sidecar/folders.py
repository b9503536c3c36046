"""The two folders the daemon needs, checked before anything starts: one line naming the variable.

``SIDECAR_WATCH_DIR`` (read, plus the watcher canary's writes) and ``SIDECAR_STATE_DIR`` (the journal and
its lock) must each be a folder this user can write, or creatable by it, and not a symbolic link (a
link swapped in later would move the journal or the watch elsewhere without a word).
"""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.config import Settings
from sidecar.errors import ConfigError


def check_folders(settings: Settings) -> None:
    """Raise ConfigError (exit 2) for the first folder that cannot serve; create nothing."""
    for variable, path in (("SIDECAR_WATCH_DIR", settings.watch_dir), ("SIDECAR_STATE_DIR", settings.state_dir)):
        problem = _problem(Path(path))
        if problem:
            raise ConfigError(f"{variable}: {path} {problem}")


def _problem(path: Path) -> str:  # noqa: PLR0911 - one early answer per way a folder can fail
    uid = os.geteuid()
    if path.is_symlink():
        return "is a symbolic link; point the variable at the real folder"
    if path.exists():
        if not path.is_dir():
            return "is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"is not writable by uid {uid}"
        return ""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created ({parent} is not a folder)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"does not exist and cannot be created by uid {uid} ({parent} is not writable)"
    return ""
