"""CPU time and memory of a process tree, read from /proc (no psutil).

Every tool under test is started in its own session (``start_new_session=True``), so "the tool" is every
process whose session id is the leader's pid, wherever it was reparented. Its CPU time is the sum over the
live members of ``utime + stime + cutime + cstime``: a child that exited and was reaped is already in its
parent's ``cutime``, a live child is not, so nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    sid: int
    cpu_s: float  # utime + stime of the process (all its threads)
    child_cpu_s: float  # cutime + cstime: its children that it has reaped
    rss: int  # bytes


def read_stat(pid: int) -> ProcStat | None:
    """One process's /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3 of proc(5)); utime is field 14, so fields[11].
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        sid=int(fields[3]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLK_TCK,
        child_cpu_s=(int(fields[13]) + int(fields[14])) / CLK_TCK,
        rss=int(fields[21]) * PAGE,
    )


def session(sid: int) -> list[ProcStat]:
    """Every live process in session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None and st.sid == sid:
                out.append(st)
    return out


def cpu_s(sid: int) -> float:
    """CPU seconds used so far by session ``sid`` (live members plus what they reaped)."""
    return sum(p.cpu_s + p.child_cpu_s for p in session(sid))


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def vm_hwm(pid: int, field: str = "VmHWM") -> int:
    """Peak resident set (VmHWM; or another /proc/<pid>/status field such as VmRSS) in bytes, 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def mem_available() -> tuple[int, int]:
    """(MemAvailable, MemTotal) in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    return values["MemAvailable"], values["MemTotal"]


@dataclass
class Limits:
    """Bounds for a tool that may run away: a deadline, a cap on its summed RSS, a floor of free memory."""

    deadline: float  # time.monotonic() value
    rss_cap: int = 8 * 1024**3
    min_available_fraction: float = 0.3

    def check(self, rss: int) -> str:
        if time.monotonic() > self.deadline:
            return "time cap"
        if rss > self.rss_cap:
            return f"memory cap ({rss / 1024**3:.1f} GiB resident)"
        available, total = mem_available()
        if available < self.min_available_fraction * total:
            return f"machine memory low ({available / 1024**3:.1f} GiB available)"
        return ""


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (its process group, then stragglers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    for p in session(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)


class Sampler(threading.Thread):
    """Samples a session every ``interval`` s: peak summed RSS, peak process count, peak single VmHWM."""

    def __init__(self, sid: int, interval: float = 0.2, limits: Limits | None = None) -> None:
        super().__init__(daemon=True, name=f"sampler-{sid}")
        self.sid = sid
        self.interval = interval
        self.limits = limits
        self.peak_rss = 0
        self.peak_procs = 0
        self.peak_hwm = 0
        self.tripped = ""  # why the limits killed the session, "" if they did not
        self.tripped_at = 0.0  # time.time() of the kill
        self._halt = threading.Event()

    def sample(self) -> list[ProcStat]:
        procs = session(self.sid)
        self.peak_rss = max(self.peak_rss, sum(p.rss for p in procs))
        self.peak_procs = max(self.peak_procs, len(procs))
        if len(procs) <= 4:  # VmHWM is per process: worth reading for daemons and loops, not for storms
            for p in procs:
                self.peak_hwm = max(self.peak_hwm, vm_hwm(p.pid))
        return procs

    def run(self) -> None:
        raise_thread_priority()  # a fork storm must not starve the thread that ends it
        while not self._halt.is_set():
            with contextlib.suppress(OSError):
                self.sample()
            if self.limits is not None and not self.tripped:
                self.tripped = self.limits.check(self.peak_rss)
                if self.tripped:
                    self.tripped_at = time.time()
                    kill_session(self.sid)
            self._halt.wait(self.interval)

    def stop(self) -> Sampler:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        return self


def raise_thread_priority() -> None:
    """Renice the calling thread (Linux nice is per thread) so a watchdog stays responsive in a fork storm."""
    with contextlib.suppress(PermissionError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def terminate(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM a started server, SIGKILL it after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
