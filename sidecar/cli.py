"""The ``sidecar`` command: run, scan, check, config, status, wait, flush, retry-failed, prune, demo.

Every command turns a :class:`ConfigError` into exit status 2 and one line on stderr, and any other
:class:`SidecarError` into status 1 and one line — never a traceback, never a secret.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from sidecar import __version__
from sidecar.config import Settings, load_settings
from sidecar.config_typos import unknown_variables
from sidecar.errors import (
    EXIT_ABORTED,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    ConfigError,
    SidecarError,
    StoreError,
)
from sidecar.logs import configure_logging

if TYPE_CHECKING:
    from sidecar.daemon import Daemon


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar", description="Upload every finished ComfyUI output to Cloudflare R2 / S3, durably."
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="watch and upload until SIGTERM (the daemon)")
    scan = sub.add_parser("scan", help="upload everything now (retry delays ignored); exit 0 only when nothing "
                          "is left pending, failed or settling")
    scan.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="give up waiting for writers and retries after S seconds (default 60)")
    check = sub.add_parser("check", help="validate the configuration and reach the bucket with one cheap request")
    check.add_argument("--offline", action="store_true",
                       help="validate everything `run` needs (bucket included) without any request")
    sub.add_parser("config", help="print the effective configuration as JSON, secrets redacted")
    sub.add_parser("status", help="print the running daemon's /status")
    wait = sub.add_parser("wait", help="wait until a ComfyUI prompt's outputs are stored; print its job as JSON; "
                          "exit 0 complete, 1 failed, 3 timeout, 4 unknown, 5 no daemon")
    wait.add_argument("prompt_id")
    wait.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up after S seconds (600)")
    flush = sub.add_parser("flush", help="upload what is pending now and wait until nothing is left; exit 0 idle, "
                           "3 timeout, 5 no daemon")
    flush.add_argument("--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds (60)")
    sub.add_parser("retry-failed", help="put every failed file back in the queue")
    prune = sub.add_parser("prune", help="delete local files that are safely uploaded, by the retention policies; "
                           "exit 1 if a policy is still exceeded")
    prune.add_argument("--dry-run", action="store_true", help="log what would be deleted, delete nothing")
    demo = sub.add_parser("demo", help="local S3 server + demo folder + sample images, until Ctrl-C")
    demo.add_argument("--once", action="store_true", help="exit by itself once the samples are uploaded")
    demo.add_argument("--dir", default="sidecar-demo", help="demo folder (default ./sidecar-demo)")
    return parser


def _fail(message: str, code: int) -> int:
    print(f"sidecar: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run, "scan": cmd_scan, "check": cmd_check, "config": cmd_config, "status": cmd_status,
        "retry-failed": cmd_retry_failed, "demo": cmd_demo, "prune": cmd_prune, "wait": cmd_wait, "flush": cmd_flush,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except SidecarError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_ABORTED
    except Exception as exc:  # a bug or a dependency's surprise: one line, the traceback only at DEBUG
        if os.environ.get("SIDECAR_LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        return _fail(f"unexpected error ({type(exc).__name__}): {_scrubbed(str(exc))[:300]} "
                     "(SIDECAR_LOG_LEVEL=DEBUG shows the traceback)", EXIT_FAILURE)


def _scrubbed(text: str) -> str:
    """``text`` without the values of secret variables (an exception may quote a URL or a header)."""
    for name in ("SIDECAR_SECRET_ACCESS_KEY", "SIDECAR_ACCESS_KEY_ID", "SIDECAR_HTTP_TOKEN"):
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "**********")
    return text.replace("\n", " ")


def _settings() -> Settings:
    settings = load_settings()
    _warn_unknown()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _warn_unknown() -> None:
    for line in unknown_variables(os.environ):
        print(f"sidecar: {line}", file=sys.stderr)


def cmd_config(_: argparse.Namespace) -> int:
    from sidecar.routing import Router  # noqa: PLC0415

    settings = load_settings()
    router = Router.from_settings(settings)
    shown = {**settings.redacted(), "effective_routes": router.describe(), "route_warnings": router.warnings()}
    print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.folders import check_folders  # noqa: PLC0415
    from sidecar.store_s3 import S3Store, make_client  # noqa: PLC0415 - boto3 import only where needed

    settings = load_settings()
    _warn_unknown()
    settings.require_bucket()
    check_folders(settings)
    if args.offline:
        print(f"ok: configuration valid for bucket {settings.bucket!r} (no request made)")
        return EXIT_OK
    secrets = [s.get_secret_value() for s in (settings.access_key_id, settings.secret_access_key) if s]
    store = S3Store(make_client(settings), settings.bucket, secrets=secrets)
    try:
        print(f"ok: {store.check()}")
    except StoreError as exc:
        return _fail(f"check failed: {exc}", EXIT_FAILURE)
    return EXIT_OK


def cmd_run(_: argparse.Namespace) -> int:
    from prometheus_client import disable_created_metrics  # noqa: PLC0415

    from sidecar.daemon import build_daemon  # noqa: PLC0415 - keeps `sidecar config` light
    from sidecar.memory import limit_malloc_arenas  # noqa: PLC0415

    # The *_created series double the exposition and tell operators nothing.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    limit_malloc_arenas()  # before any thread starts: RSS stays flat over a long stream
    settings = _settings()
    daemon = build_daemon(settings)
    return run_until_signalled(daemon, settings.drain_timeout_s)


def run_until_signalled(daemon: Daemon, drain_timeout_s: float) -> int:
    """Start ``daemon``; on the first SIGTERM/SIGINT drain within the budget and exit 0; a second exits now.

    If the daemon cannot go on (its journal was deleted or replaced), it drains the same way and exits 1,
    so that supervisord restarts it on a fresh journal.
    """
    stop = threading.Event()
    received: list[float] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if received:
            os.write(2, b'{"event": "shutdown_aborted", "level": "warning"}\n')
            os._exit(EXIT_ABORTED)
        received.append(time.monotonic())
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # lease breaks (see localfile.writer_holds) must not kill us
    daemon.start()
    while not stop.wait(timeout=1.0):
        if daemon.fatal.is_set():
            received.append(time.monotonic())
            break
    daemon.stop(deadline=received[0] + drain_timeout_s)
    daemon.close()
    sys.stdout.flush()
    if daemon.fatal.is_set():
        print(f"sidecar: {daemon.fatal_reason}; exiting so that a restart rebuilds it", file=sys.stderr)
    # Worker threads still cut off by the deadline are daemon threads; leave without waiting for them.
    os._exit(EXIT_FAILURE if daemon.fatal.is_set() else EXIT_OK)


def cmd_scan(args: argparse.Namespace) -> int:
    from sidecar.daemon import Daemon  # noqa: PLC0415
    from sidecar.journal import FAILED, PENDING, UPLOADED, UPLOADING  # noqa: PLC0415

    signal.signal(signal.SIGIO, signal.SIG_IGN)  # lease breaks (see localfile.writer_holds) must not kill us
    settings = _settings()
    daemon = Daemon(settings)  # takes the state lock: beside a running daemon this exits 2, touching nothing
    daemon.start(watch=False)
    daemon.journal.due_now()  # "upload everything now": files waiting out a retry delay go at once
    deadline = time.monotonic() + args.timeout
    blocked = ""
    try:
        while not _scan_finished(daemon) and not (blocked := _store_blocks(daemon)):
            if time.monotonic() > deadline:
                blocked = (f"gave up after {args.timeout:g} s (--timeout): {len(daemon.settler)} file(s) still "
                           "being written or settling; pending files stay queued for the daemon")
                break
            time.sleep(0.05)
        stats = daemon.journal.stats()
        settling = len(daemon.settler)
    finally:
        daemon.stop(deadline=time.monotonic() + settings.drain_timeout_s)
        daemon.close()
    pending = stats[PENDING][0] + stats[UPLOADING][0]
    summary = {"uploaded": stats[UPLOADED][0], "pending": pending, "failed": stats[FAILED][0], "settling": settling}
    print(json.dumps(summary))
    if blocked:
        _fail(blocked, EXIT_FAILURE)
    return EXIT_FAILURE if summary["failed"] or pending or settling else EXIT_OK


SCAN_OUTAGE_LIMIT_S = 60.0


def _store_blocks(daemon: Daemon) -> str:
    """Why a one-shot scan cannot finish now: the store is unusable, or down for over a minute ('' if not)."""
    store = daemon.health.snapshot()
    if store["state"] == "broken" or (store["state"] == "down" and store.get("since_s", 0) > SCAN_OUTAGE_LIMIT_S):
        hint = f" (hint: {store['hint']})" if store.get("hint") else ""
        return f"the store is {store['state']}: {store['problem']}{hint}; files stay pending"
    return ""


def _scan_finished(daemon: Daemon) -> bool:
    """The scan ran, nothing is settling or in flight, and nothing in the journal is due now.

    Read in pipeline order (settler, workers, journal): a file moves settler → journal pending → claimed
    (uploading) → done, and each stage lets go only after the next has it, so no file is missed in between.
    """
    from sidecar.journal import UPLOADING  # noqa: PLC0415

    if not daemon.maintenance.last_scan or len(daemon.settler) or daemon.uploader.inflight():
        return False
    due = daemon.journal.next_due_in()
    return daemon.journal.stats()[UPLOADING][0] == 0 and (due is None or due > 0)


def cmd_retry_failed(_: argparse.Namespace) -> int:
    from sidecar.journal import Journal  # noqa: PLC0415

    # No state lock: rewriting rows is safe beside a running daemon (SQLite serialises the writers), which
    # claims the requeued rows within a second.
    settings = load_settings()
    journal = Journal(settings.journal_path)
    try:
        print(f"requeued {journal.requeue_failed()} failed file(s)")
    finally:
        journal.close()
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from sidecar.prune import run_prune  # noqa: PLC0415

    return run_prune(_settings(), dry_run=bool(args.dry_run))


def cmd_status(_: argparse.Namespace) -> int:
    from sidecar.cli_wait import NoDaemon, local_get  # noqa: PLC0415

    settings = load_settings()
    try:
        code, data = local_get(settings, "/status")
    except NoDaemon as exc:
        return _fail(str(exc), EXIT_FAILURE)
    if code != 200:
        return _fail(f"the daemon on port {settings.http_port} answered HTTP {code}", EXIT_FAILURE)
    print(render_status(data))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    from sidecar.cli_wait import run_wait  # noqa: PLC0415

    return run_wait(load_settings(), args.prompt_id, args.timeout)


def cmd_flush(args: argparse.Namespace) -> int:
    from sidecar.cli_wait import run_flush  # noqa: PLC0415

    return run_flush(load_settings(), args.timeout)


def render_status(data: dict[str, object]) -> str:
    """The /status document as a few readable lines."""
    lines = [f"sidecar {data.get('version')}"]
    counts = data.get("counts", {})
    if isinstance(counts, dict):
        lines.append("  " + "  ".join(f"{state}={c['files']}" for state, c in counts.items()))
    lines.append(f"  oldest pending: {data.get('oldest_pending_age_s')} s   last key: {data.get('last_uploaded_key')}")
    watcher = data.get("watcher", {})
    store = data.get("store", {})
    lines.append(f"  watcher: {watcher}   store: {store}")
    retention = data.get("retention", {})
    if isinstance(retention, dict) and retention.get("enabled"):
        lines.append(f"  retention: free {retention.get('free_bytes')} of {retention.get('total_bytes')} bytes, "
                     f"deleted since start {retention.get('deleted_since_start')}, dry run {retention.get('dry_run')}")
    jobs = data.get("jobs", {})
    if isinstance(jobs, dict) and jobs.get("comfyui_url"):
        lines.append(f"  jobs: {jobs.get('jobs')}   ComfyUI {'up' if jobs.get('comfyui_up') else 'not answering'}"
                     f"{' (websocket)' if jobs.get('websocket') else ''}   requests {jobs.get('comfyui_requests')}")
    failures = data.get("recent_failures", [])
    if isinstance(failures, list) and failures:
        lines.append("  recent failures:")
        lines.extend(f"    {f['path']}: {f['error']}" for f in failures)
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo  # noqa: PLC0415

    return run_demo(args.dir, once=args.once)
