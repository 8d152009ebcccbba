"""AUTH failures per client address, across sessions: the brute-force brake.

`limits.max_auth_failures` ends one session after a few wrong passwords; a guesser
then simply reconnects. Here every failure from an address counts for
`limits.auth_failure_window`: each failed AUTH is answered only after
`limits.auth_failure_delay` (Postfix's smtpd_error_sleep_time does the same for
errors), and once an address has `limits.max_auth_failures_per_ip` failures in the
window, its AUTH commands get `421 4.7.0` before any password is checked (no scrypt
spent on it) until the window ends. Counts are per worker: with N workers an address
may get up to N times the limit before every worker refuses it (documented in the
README). The table is bounded: past MAX_ADDRESSES the entries nearest expiry go first.
"""

from __future__ import annotations

MAX_ADDRESSES = 10_000


class AuthFailures:
    """Failure counts per client address within a sliding window of `window` seconds."""

    __slots__ = ("limit", "window", "_seen")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._seen: dict[str, tuple[int, float]] = {}  # ip → (failures, first failure time)

    def blocked(self, ip: str, now: float) -> bool:
        """True when `ip` has used up its failures for the current window."""
        if self.limit <= 0:
            return False
        entry = self._seen.get(ip)
        if entry is None:
            return False
        if now - entry[1] >= self.window:
            del self._seen[ip]
            return False
        return entry[0] >= self.limit

    def failed(self, ip: str, now: float) -> None:
        entry = self._seen.get(ip)
        if entry is None or now - entry[1] >= self.window:
            if entry is None and len(self._seen) >= MAX_ADDRESSES:
                self._evict(now)
            self._seen[ip] = (1, now)
        else:
            self._seen[ip] = (entry[0] + 1, entry[1])

    def _evict(self, now: float) -> None:
        """Drop expired entries; if none expired, the oldest tenth (a bounded table
        under a flood of addresses forgets the oldest guessers first)."""
        for ip in [ip for ip, (_, t) in self._seen.items() if now - t >= self.window]:
            del self._seen[ip]
        if len(self._seen) >= MAX_ADDRESSES:
            oldest = sorted(self._seen.items(), key=lambda kv: kv[1][1])[: MAX_ADDRESSES // 10]
            for ip, _ in oldest:
                del self._seen[ip]

    def __len__(self) -> int:
        return len(self._seen)
