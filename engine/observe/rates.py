"""1, 5 and 15 minute rates of a few counters, for `status`.

The supervisor feeds a `RateWindow` the merged counters every few seconds with the
monotonic time of the sample, and once more when it answers `status`; a rate is the
counter's increase between the sample at (or just before) the start of the window and
the newest sample, divided by the time between those two samples. Like a load average,
but exact over the window instead of exponentially decayed, so "delivered 1m" is what
an operator would count by hand.

The window starts with a sample of zeros at the time the counters started (`start`):
without it, mail that arrived before the first periodic sample was never seen as an
increase, and the rates read 0 for ever after a burst at start. Each window also
reports `seconds`, the time it really covers: less than the window on a server younger
than it (then every window is the same average since start, and `status` says so), and
up to one sampling interval more than the window otherwise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

WINDOWS: tuple[tuple[str, float], ...] = (("1m", 60.0), ("5m", 300.0), ("15m", 900.0))
RATE_COUNTERS = ("received", "delivered", "deferred", "bounced")


class RateWindow:
    """A ring of (time, counters) samples covering the longest window.

    Memory is bounded: a sample within `min_interval` of the last one added replaces the
    newest one instead of adding, so at most horizon / min_interval + 2 samples are kept
    however often `add` is called, and samples older than the longest window (except
    the one just before its start) are dropped.

    With less history than a window (just after start), that window's rate uses all the
    history there is: the oldest sample to the newest. With fewer than two samples, or
    none apart in time, every rate is 0.0. A counter that went down (it should not: the
    supervisor keeps totals monotonic across worker restarts) gives 0.0, not a negative
    rate.
    """

    def __init__(self, names: Iterable[str] = RATE_COUNTERS, *,
                 windows: tuple[tuple[str, float], ...] = WINDOWS, min_interval: float = 1.0,
                 start: float | None = None) -> None:
        self.names = tuple(names)
        self.windows = windows
        self.horizon = max(seconds for _, seconds in windows)
        self.min_interval = min_interval
        self._samples: deque[tuple[float, tuple[int, ...]]] = deque()
        self._appended = float("-inf")  # time of the last sample added rather than replaced
        if start is not None:
            # Every counter was 0 when they started: the first increase is an increase.
            self._samples.append((start, (0,) * len(self.names)))
            self._appended = start

    def add(self, now: float, counters: Mapping[str, int]) -> None:
        """Record the counters at monotonic time `now` (missing names count as 0)."""
        values = tuple(counters.get(name, 0) for name in self.names)
        samples = self._samples
        if samples and now < samples[-1][0]:
            return  # time went backwards (a caller's bug): keep the ring ordered
        # Within min_interval of the last append, the newest sample is refreshed instead:
        # appends stay min_interval apart, which is what bounds the ring.
        # The first sample (the zeros at start) is never replaced: it is the base of
        # every rate until the server is older than the window.
        if len(samples) >= 2 and now - self._appended < self.min_interval:
            samples[-1] = (now, values)
        else:
            samples.append((now, values))
            self._appended = now
        # Keep exactly one sample at or before the start of the longest window.
        while len(samples) >= 2 and samples[1][0] <= now - self.horizon:
            samples.popleft()

    def history(self) -> float:
        """Seconds between the oldest and the newest sample kept."""
        if len(self._samples) < 2:
            return 0.0
        return self._samples[-1][0] - self._samples[0][0]

    def rates(self, now: float, counters: Mapping[str, int] | None = None) -> dict[str, dict[str, float]]:
        """{"1m": {name: per_second, ..., "seconds": covered}, "5m": ..., "15m": ...} as of
        `now`; `counters` (the counts now) are added as a sample first, so what arrived
        since the last periodic sample counts. "seconds" is the time the rates cover
        (0.0 with no two samples apart in time, and then every rate is 0.0)."""
        if counters is not None:
            self.add(now, counters)
        out: dict[str, dict[str, float]] = {}
        samples = self._samples
        for label, seconds in self.windows:
            if len(samples) < 2:
                out[label] = {**dict.fromkeys(self.names, 0.0), "seconds": 0.0}
                continue
            t1, v1 = samples[-1]
            t0, v0 = self._base(now - seconds)
            span = t1 - t0
            if span <= 0:
                out[label] = {**dict.fromkeys(self.names, 0.0), "seconds": 0.0}
                continue
            row = {name: max(0, b - a) / span for name, a, b in zip(self.names, v0, v1)}
            row["seconds"] = span
            out[label] = row
        return out

    def _base(self, start: float) -> tuple[float, tuple[int, ...]]:
        # The newest sample at or before `start`, else the oldest there is. A linear scan
        # from the left: the ring holds at most ~900 samples and `rates` runs when
        # someone asks for status, not per message.
        samples = self._samples
        base = samples[0]
        for sample in samples:
            if sample[0] > start:
                break
            base = sample
        return base
