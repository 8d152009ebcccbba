"""Shared pieces of the fault-injection tests (real processes, real signals, real disk).

`SyscallTrace` attaches strace to a running worker and reads back, in the order the
kernel let the traced threads run, the writes to the queue's data file, its flushes and
the replies written to client sockets. strace reports a syscall's return before any
other thread can act on its result (the returning thread is stopped until strace has
seen it), so the line order of one trace file is a causal order across threads.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.harness import wait_until
from tests.integration.relay_helpers import body
from tests.integration.smtp_client import RawSmtp

TRACED = "fsync,fdatasync,msync,write,writev,pwrite64,sendto,sendmsg"
_LINE = re.compile(r"^(\d+)\s+\d+\.\d+\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((\d+)[,)< ]")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>")
_RET = re.compile(r"\)\s+=\s+(-?\d+)")
_OFFSET = re.compile(r",\s*(\d+)\)\s+=\s+-?\d+")


@dataclass
class Call:
    tid: int
    name: str
    fd: int
    text: str  # the arguments as strace printed them (buffers escaped)
    start: int  # line index of the entry
    end: int = -1  # line index of the return
    ret: int | None = None
    offset: int | None = None  # pwrite64's file offset


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)

    def parse(self, text: str) -> None:
        open_: dict[int, Call] = {}
        for i, raw in enumerate(text.splitlines()):
            m = _LINE.match(raw)
            if not m:
                continue
            tid, rest = int(m.group(1)), m.group(2)
            r = _RESUMED.match(rest)
            if r:
                call = open_.pop(tid, None)
                if call is not None:
                    call.end = i
                    call.text += rest
                    self._finish(call, rest)
                continue
            c = _CALL.match(rest)
            if not c:
                continue
            call = Call(tid, c.group(1), int(c.group(2)), rest, i)
            self.calls.append(call)
            if rest.endswith("<unfinished ...>"):
                open_[tid] = call
            else:
                call.end = i
                self._finish(call, rest)

    @staticmethod
    def _finish(call: Call, tail: str) -> None:
        ret = _RET.search(tail)
        call.ret = int(ret.group(1)) if ret else None
        if call.name == "pwrite64":
            off = _OFFSET.search(call.text)
            call.offset = int(off.group(1)) if off else None


def data_fds(pid: int, queue_path: str) -> set[int]:
    """The worker's descriptors open on the queue's data file."""
    target = os.path.realpath(os.path.join(queue_path, "data.mdb"))
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                out.add(int(name))
        except OSError:
            continue
    return out


def flush_violations(trace: Trace, fds: set[int], acks: dict[str, str],
                     psize: int = mmap.PAGESIZE) -> list[str]:
    """Which acknowledged messages were not provably on disk before their 250.

    `acks` maps each message's unique tag (in its content) to the queue id its 250
    named. For each: the first write to the data file carrying the tag (the commit that
    stored it), then that thread's next meta-page write (offset inside the first two
    pages: the commit's pointer to the new tree), then a successful fdatasync/fsync of
    the data file entered after that meta write returned and returned before the write
    of the socket reply `250 ... queued as ID` was entered. Anything missing is a
    violation: the 250 could have outrun the disk.
    """
    data_writes = [c for c in trace.calls if c.fd in fds and c.name in ("pwrite64", "writev", "write")]
    flushes = [c for c in trace.calls
               if c.fd in fds and c.name in ("fdatasync", "fsync") and c.ret == 0]
    replies = [c for c in trace.calls if c.fd not in fds and c.name in ("write", "writev", "sendto",
                                                                         "sendmsg")]
    bad = []
    for tag, qid in acks.items():
        ack = next((c for c in replies if f"queued as {qid}" in c.text), None)
        if ack is None:
            bad.append(f"{tag}: no 250 for {qid} in the trace")
            continue
        stored = next((c for c in data_writes if tag in c.text), None)
        if stored is None:
            bad.append(f"{tag}: never written to the data file")
            continue
        meta = next((c for c in data_writes if c.tid == stored.tid and c.start > stored.end
                     and c.name == "pwrite64" and c.offset is not None
                     and c.offset < 2 * psize), None)
        if meta is None:
            bad.append(f"{tag}: no meta page written after its pages")
            continue
        if not any(meta.end < f.start and f.end < ack.start for f in flushes):
            bad.append(f"{tag}: 250 for {qid} sent with no flush of the data file after its commit")
    return bad


class SyscallTrace:
    """`strace -f -p PID` writing to `out` until stop(); skips the test when strace is
    missing or ptrace is refused."""

    def __init__(self, pid: int, out: Path, max_string: int = 8192) -> None:
        exe = shutil.which("strace")
        if exe is None:
            pytest.skip("strace is not installed: the syscall-order proof needs it")
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "-f", "-ttt", "-s", str(max_string), "-e", f"trace={TRACED}", "-p", str(pid),
             "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self._attached = threading.Event()
        self._threads = len(os.listdir(f"/proc/{pid}/task"))  # later ones are followed (-f)
        self._seen = 0
        self._err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_until(lambda: self._attached.is_set() or self.proc.poll() is not None, 20,
                       "strace attached")
        except TimeoutError:
            self.stop()
            raise
        if not self._attached.is_set():
            self.stop()
            text = "".join(self._err)
            if "ptrace" in text or "Operation not permitted" in text:
                pytest.skip(f"ptrace refused here: {text.strip()}")
            raise RuntimeError(f"strace failed: {text}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)
            if "attached" in line:
                # "Process N attached with K threads" covers them all at once.
                self._seen += 1
                if "attached with" in line or self._seen >= self._threads:
                    self._attached.set()

    def stop(self) -> Trace:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # strace detaches and flushes its file
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        trace = Trace()
        if self.out.exists():
            trace.parse(self.out.read_text(errors="replace"))
        return trace


def lmdb_readers(queue_path: str) -> list[int]:
    """Pids in the queue's LMDB reader table, read by a separate process (the test
    process never opens the environment while a server may fork, finding 9)."""
    code = ("import lmdb, sys\n"
            "env = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=8, subdir=True)\n"
            "print(env.readers())\n")
    out = subprocess.run([sys.executable, "-c", code, queue_path], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    pids = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            pids.append(int(parts[0]))
    return pids


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def open_mid_data(port: int, sender: str, rcpt: str, tag: str = "mid-data") -> RawSmtp:
    """A client inside DATA on 127.0.0.1:`port`, part of its body sent and no end in
    sight: kill the worker now and the message is one the client never had a 250 for."""
    client = RawSmtp("127.0.0.1", port, timeout=10)
    assert client.cmd("EHLO client.test")[0] == 250
    assert client.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(body(tag)[:40])
    return client
