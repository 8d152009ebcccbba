"""What a server's whole process tree costs: CPU seconds and peak memory, from /proc.

A server is measured from one root pid down through every descendant, found by
parent pid: Volley's supervisor and its workers, Postfix's master and every daemon it
forked (smtpd, cleanup, qmgr, smtp, trivial-rewrite, postlogd ...), the aiosmtpd process.
CPU is utime+stime+cutime+cstime, so a daemon that exited during the run (Postfix
recycles its processes) still counts once its parent reaped it. Memory is each live
process's VmHWM (peak resident set); shared pages (libraries, LMDB's map) are counted
in every process that touches them, so the sum is an upper bound.

Beside it, each process's resident set split as the kernel keeps it (/proc/PID/status,
now, not a peak): RssAnon (heap, stacks: memory the process owns), RssFile (pages of
mapped files: libraries and LMDB's read-only map, i.e. page cache, clean, shared and
reclaimable) and RssShmem. A reader of a big LMDB file shows a large RssFile even when
it reads little: on each read fault the kernel maps the neighbouring pages already in
the page cache too (fault-around, 64 KiB or more), so RSS and VmHWM follow the file's
size while RssAnon follows the heap.
"""

from __future__ import annotations

import collections
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


# The fields of /proc/PID/status a sample keeps, all in KiB.
STATUS_KEYS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")


@dataclass
class ProcessMemory:
    """One process's memory (KiB): peak RSS, and the current RSS split by kind."""

    pid: int
    comm: str
    hwm_kib: int = 0
    anon_kib: int = 0
    file_kib: int = 0
    shmem_kib: int = 0
    pss_kib: int = 0  # 0 unless the sample asked for PSS

    def as_dict(self) -> dict[str, object]:
        """For JSON: MiB figures, rounded."""
        mib = {k: round(getattr(self, f"{k}_kib") / 1024, 1) for k in ("hwm", "anon", "file", "shmem", "pss")}
        return {"pid": self.pid, "comm": self.comm, **{f"{k}_mib": v for k, v in mib.items()}}


@dataclass
class TreeSample:
    cpu_s: float = 0.0
    rss_kib: int = 0  # sum of VmHWM over the live processes
    pss_kib: int = 0  # sum of Pss now (shared pages split between their users), if asked
    anon_kib: int = 0  # sum of RssAnon now: heap and stacks, what grows if a process leaks
    file_kib: int = 0  # sum of RssFile now: mapped file pages (page cache; shared ones counted per process)
    shmem_kib: int = 0  # sum of RssShmem now
    processes: list[tuple[int, str, float, int]] = field(default_factory=list)  # pid, comm, cpu s, VmHWM KiB
    memory: list[ProcessMemory] = field(default_factory=list)  # in the order of `processes`


def _read_stat(pid: int) -> tuple[int, str, float] | None:
    """(ppid, comm, cpu seconds incl. reaped children) or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    close = raw.rindex(")")  # comm may hold spaces or parens
    fields = raw[close + 2 :].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return int(fields[1]), raw[raw.index("(") + 1 : close], ticks / TICK


def status_kib(pid: int) -> dict[str, int]:
    """STATUS_KEYS of /proc/PID/status in KiB (0 for each when the process is gone, and
    for a key the kernel does not report, e.g. a zombie's)."""
    out = dict.fromkeys(STATUS_KEYS, 0)
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0])
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(root: int, pss: bool = False) -> TreeSample:
    """One pass over /proc: the tree under `root` (included). `pss` also sums the
    processes' proportional set size, the fair share of memory they hold right now
    (Postfix's ~100 small processes share most of their pages)."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            parents[int(entry.name)] = stat[0]
            info[int(entry.name)] = (stat[1], stat[2])
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    out = TreeSample()
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        if pid not in info:
            continue
        comm, cpu = info[pid]
        st = status_kib(pid)
        mem = ProcessMemory(pid, comm, st["VmHWM"], st["RssAnon"], st["RssFile"], st["RssShmem"],
                            _pss_kib(pid) if pss else 0)
        out.cpu_s += cpu
        out.rss_kib += mem.hwm_kib
        out.pss_kib += mem.pss_kib
        out.anon_kib += mem.anon_kib
        out.file_kib += mem.file_kib
        out.shmem_kib += mem.shmem_kib
        out.processes.append((pid, comm, cpu, mem.hwm_kib))
        out.memory.append(mem)
    return out


def free_port(host: str) -> int:
    """A port that was free a moment ago on `host`, for programs that cannot be told to
    take any port and report it (Postfix, smtp-sink)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def smtp_banner(host: str, port: int) -> bool:
    """True once something answers 220 on host:port (then QUIT politely)."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            ok = s.recv(512).startswith(b"220")
            s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False

