"""Unknown ``SIDECAR_*`` variables (typos): one warning each, naming the closest setting."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from sidecar.config import ENV_PREFIX, SECRETS_DIR_VAR, Settings

# SIDECAR_* variables that are not settings but are read by the image's scripts and the test suite.
OTHER_VARIABLES = frozenset({
    SECRETS_DIR_VAR, "SIDECAR_USER", "SIDECAR_PYTHON", "SIDECAR_BIN", "SIDECAR_VENV", "SIDECAR_HOME",
    "SIDECAR_STOPWAITSECS", "SIDECAR_TEMPLATE_START", "SIDECAR_INSTALL_PYTHON", "SIDECAR_PYTHONPATH",
})
OTHER_PREFIXES = ("SIDECAR_TEST_", "SIDECAR_CI_", "SIDECAR_FATAL")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``SIDECAR_*`` variable that is no setting (a typo?), naming the closest valid one."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    lines = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"warning: {name} is not a setting and is ignored{hint}")
    return lines
