"""What the control commands need of the supervisor, said here in control.

The supervisor (engine/supervisor/) sits above control: it starts the control
server and hands it itself. The commands talk to it only through these Protocols,
so control never imports the supervisor and a test may hand the commands anything
with the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from engine.config import Config
from engine.control.wire import AnyAnswer, Query, ToWorker


class WorkerHandle(Protocol):
    """One worker slot as the supervisor keeps it."""

    @property
    def slot(self) -> int: ...

    @property
    def pid(self) -> int | None:
        """The pid of its process (the last one while it is being restarted); None
        before the first start."""

    @property
    def started_at(self) -> float:
        """time.monotonic() of the current process's start."""

    @property
    def restarts(self) -> int: ...

    @property
    def running(self) -> bool:
        """Started and accepting (it said Ready)."""

    async def ask(self, query: Query, timeout: float) -> AnyAnswer:
        """The worker's answer; `Refused` when it is down or silent for `timeout` s."""


class SupervisorHandle(Protocol):
    @property
    def cfg(self) -> Config:
        """The configuration in force (replaced by a reload)."""

    @property
    def config_path(self) -> str | None:
        """The file the configuration came from; None on the built-in defaults."""

    @property
    def addresses(self) -> list[str]:
        """The bound listener addresses; none once draining (they are closed)."""

    @property
    def draining(self) -> bool: ...

    @property
    def slots(self) -> Sequence[WorkerHandle]: ...

    def broadcast(self, message: ToWorker) -> None:
        """Send `message` to every running worker."""

    def reload(self) -> tuple[str, list[str]]:
        """Re-read the configuration file: ("reloaded", settings kept as started),
        ("skipped", [why]) with no file to re-read, ("refused", [error])."""

    def drain(self) -> None:
        """Stop accepting everywhere; delivery goes on."""

    def request_stop(self) -> None:
        """Begin the shutdown."""

    def cluster_status(self) -> dict[str, Any] | None:
        """[cluster]: the link's state (healthy/degraded, live nodes) and this node's
        share of each provider limit; None when the node runs alone."""
