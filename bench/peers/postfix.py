"""A private Postfix instance for bench/run.py: a relay on loopback, measured the same way as Volley.

main.cf and master.cf are generated (never appended: a key set twice wedged an
instance) in a fresh directory, with the queue, data directory and log file beside them;
`postfix -c DIR start|stop` runs this instance only, never the system's. Everything
else is Postfix's default, notably the fsync of each queue file before the 250,
`in_flow_delay = 1s` and 20 connections per destination.

Two shapes:
* relay: `relayhost`, `default_transport` and `relay_transport` all go to the sink's
  `[HOST]:PORT`; no DNS (`smtp_dns_support_level = disabled`), no TLS; optionally a
  transport map sends each domain to its own `[ADDRESS]:PORT` (bench/dests.py);
* receive only (`relay_to=None`): every message is put on hold by `check_client_access
  static:HOLD`, so cleanup writes and fsyncs its queue file as usual but nothing is
  scheduled or delivered (the same work as Volley with delivery off).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from peers.procs import smtp_banner

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
QUEUES = ("maildrop", "incoming", "active", "deferred")  # not "hold": held is at rest

# The internal services a relay needs, chroot off (the queue is not under /var/spool).
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def unavailable() -> str | None:
    """Why Postfix rows cannot run here, or None."""
    if not Path(POSTFIX).exists():
        return "postfix is not installed (make bench-peers)"
    if os.geteuid() != 0:
        return "postfix needs root to start an instance"
    return None


def version() -> str:
    try:
        return subprocess.run([POSTCONF, "-d", "-h", "mail_version"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main_cf(root: Path, relay_to: str | None, transport: Path | None = None) -> str:
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": root / "queue",
        "data_directory": root / "data",
        "maillog_file": root / "maillog",
        "maillog_file_prefixes": root,
        "myhostname": "postfix.peers.test",
        "mydomain": "peers.test",
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 no local delivery here",
        "alias_maps": "",
        "alias_database": "",
        "mynetworks": "127.0.0.0/8",
        "inet_interfaces": "127.0.0.1",  # must exist on an interface; the listener is in master.cf
        "inet_protocols": "ipv4",
        "smtpd_peername_lookup": "no",
        "smtpd_tls_security_level": "none",
        "smtp_tls_security_level": "none",
        "smtp_dns_support_level": "disabled",
        "smtp_bind_address": "127.0.0.1",
        "biff": "no",
        "append_dot_mydomain": "no",
    }
    if relay_to is None:
        settings["smtpd_relay_restrictions"] = "check_client_access static:HOLD, permit_mynetworks, reject"
    else:
        settings["smtpd_relay_restrictions"] = "permit_mynetworks, reject"
        settings["relayhost"] = f"[{relay_to.rpartition(':')[0]}]:{relay_to.rpartition(':')[2]}"
        settings["default_transport"] = settings["relay_transport"] = f"smtp:{settings['relayhost']}"
    if transport is not None:
        # Each domain -> smtp:[address]:port. The nexthop is the queue manager's
        # destination, so default_destination_concurrency_limit (20) applies per address,
        # as it would to MX hosts on the internet. texthash: no postmap step.
        settings["transport_maps"] = f"texthash:{transport}"
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


class PostfixInstance:
    """One instance in `root` (created by the caller, removed by the caller after stop())."""

    def __init__(self, root: Path, listen: str, relay_to: str | None,
                 transport: dict[str, str] | None = None) -> None:
        """transport: domain -> "[address]:port" for the transport map (relay only)."""
        self.root = root
        self.listen = listen
        self.etc = root / "etc"
        self.etc.mkdir()
        # Postfix's daemons run as the postfix user: it must be able to reach the queue
        # (so `root` must sit in directories the postfix user may search).
        # postfix-script creates the queue's subdirectories, not the queue or data
        # directory themselves; master takes its lock file in the data directory.
        root.chmod(0o755)
        (root / "queue").mkdir(mode=0o755)
        (root / "data").mkdir(mode=0o700)
        shutil.chown(root / "data", "postfix")
        table = None
        if transport:
            table = self.etc / "transport"
            table.write_text("".join(f"{domain} smtp:{hop}\n" for domain, hop in transport.items()))
        (self.etc / "main.cf").write_text(main_cf(root, relay_to, table))
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=listen))
        self.master_pid = 0
        self._log_offset = 0

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 30) -> None:
        """`postfix -c DIR start` (creates the queue directories), then wait until the
        listener answers with its banner."""
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.master_pid = int(pid_file.read_text().split()[0])
                if self._banner():
                    return
            except (OSError, ValueError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix not answering on {self.listen} after {timeout:.0f}s:\n"
                                   + self.log_tail())
            time.sleep(0.1)

    def _banner(self) -> bool:
        host, _, port = self.listen.rpartition(":")
        return smtp_banner(host, int(port))

    def queued(self) -> int:
        """Files in the queues that still have work to do (hold excluded)."""
        total = 0
        for name in QUEUES:
            for _dirpath, _dirs, files in os.walk(self.root / "queue" / name):
                total += len(files)
        return total

    def wait_drained(self, stall: float, cap: float) -> None:
        """Until no queue file is left; raises when the count stops falling for `stall` s."""
        deadline = time.monotonic() + cap
        last, since = -1, time.monotonic()
        while (n := self.queued()) > 0:
            now = time.monotonic()
            if n != last:
                last, since = n, now
            if now - since > stall or now > deadline:
                raise RuntimeError(f"postfix queue still holds {n} files (stalled {now - since:.0f}s):\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def delays(self) -> list[float]:
        """`delay=` of the `status=sent` log lines since the last call: seconds from the
        message's arrival (its queue file is created at MAIL FROM) to delivery."""
        try:
            with (self.root / "maillog").open("rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        cut = data.rfind(b"\n") + 1  # a partly written last line waits for the next call
        self._log_offset += cut
        text = data[:cut].decode("utf-8", "replace")
        return [float(m.group(1)) for m in re.finditer(r"delay=([0-9.]+),.*status=sent", text)]

    def log_tail(self, lines: int = 15) -> str:
        try:
            tail = (self.root / "maillog").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = []
        return "\n".join(f"  | {line}" for line in tail)

    def stop(self) -> None:
        """`postfix -c DIR stop`; whatever survives (master's process group) is killed."""
        try:
            self._postfix("stop", timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        deadline = time.monotonic() + 15
        while self.master_pid and _alive(self.master_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.master_pid and _alive(self.master_pid):
            try:  # master is its own session and group leader; its daemons share the group
                os.killpg(self.master_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """Running (master is not our child: once it exits, init reaps it, but a zombie
    may be seen for a moment)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
