"""The users file of SMTP AUTH: who may log in, with which scrypt hash.

One ``user:hash`` per line; blank lines and lines starting with ``#`` are ignored.
The hash format is passwords.py's. Everything here is pure file handling except
`authenticate`, which moves the scrypt work to an executor: one verification costs
~50 ms at the default cost and would stall every session on the worker's event loop.
Passwords never appear in exception messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from concurrent.futures import Executor

from engine.inbound.passwords import (
    DEFAULT_LN,
    dummy_hash,
    hash_password,
    parse_hash,
    verify_password,
)

__all__ = ["UserDb", "authenticate", "check_username", "set_user"]


def check_username(user: str) -> None:
    """Refuse names the users file (or a SASL authcid) cannot carry.

    Raises:
        ValueError: the name is empty, contains ':' (the field separator), whitespace
            or control characters, or starts with '#' (it would read as a comment).
    """
    if not user:
        raise ValueError("user name must not be empty")
    if ":" in user:
        raise ValueError("user name must not contain ':'")
    if any(ch.isspace() or not ch.isprintable() for ch in user):
        raise ValueError("user name must not contain whitespace or control characters")
    if user.startswith("#"):
        raise ValueError("user name must not start with '#'")


def _parse_line(line: str) -> tuple[str, str] | None:
    """One users-file line → (user, hash), or None for blank/comment lines.

    Raises:
        ValueError: the line is not `user:hash` with a valid name and hash.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    user, sep, encoded = stripped.partition(":")
    if not sep:
        raise ValueError("expected user:hash")
    check_username(user)
    parse_hash(encoded)
    return user, encoded


class UserDb:
    """The users file, parsed: user name → encoded scrypt hash."""

    __slots__ = ("_users", "_dummy")

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self._users: dict[str, str] = dict(users or {})
        first = next(iter(self._users.values()), None)
        self._dummy = dummy_hash(first)

    @classmethod
    def load(cls, path: str) -> UserDb:
        """Read a users file; an empty path or a missing file is an empty database.

        Raises:
            ValueError: a line is malformed or a user appears twice; the message reads
                `path:lineno: problem` (never the hash itself).
            OSError: the file exists but cannot be read.
        """
        if not path:
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return cls()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not valid UTF-8") from None
        users: dict[str, str] = {}
        for lineno, line in enumerate(lines, 1):
            try:
                entry = _parse_line(line)
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
            if entry is None:
                continue
            user, encoded = entry
            if user in users:
                # Refuse rather than pick one: which entry wins would be a guess.
                raise ValueError(f"{path}:{lineno}: duplicate user {user!r}")
            users[user] = encoded
        return cls(users)

    def lookup(self, user: str) -> str | None:
        """The encoded hash for `user`, or None if there is no such user."""
        return self._users.get(user)

    @property
    def dummy_hash(self) -> str:
        """A hash as costly as this database's entries, for unknown users."""
        return self._dummy

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def __repr__(self) -> str:
        return f"<UserDb {len(self._users)} users>"

    @staticmethod
    def set_user(path: str, user: str, password: str, *, ln: int = DEFAULT_LN) -> None:
        """Same as the module-level `set_user`."""
        set_user(path, user, password, ln=ln)


def set_user(path: str, user: str, password: str, *, ln: int = DEFAULT_LN) -> None:
    """Add `user` to the users file at `path`, or replace its password.

    Other lines (users, comments) are kept verbatim. The new file is written beside
    the old one with mode 0600, fsynced and renamed over it, so a crash leaves either
    the old or the new file, never a torn one, and the hashes are never world-readable.
    Two concurrent writers race: the last rename wins (the CLI is the only writer).

    Raises:
        ValueError: bad user name, empty password, or the existing file is malformed
            (`path:lineno: problem`; we do not rewrite a file we cannot parse).
        OSError: the directory or file cannot be written.
    """
    check_username(user)
    if not password:
        # RFC 4616 §2: passwd is 1*SAFE, so an empty password could never log in.
        raise ValueError("password must not be empty")
    UserDb.load(path)  # validates the existing file, naming the bad line
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    new_line = f"{user}:{hash_password(password, ln=ln)}"
    replaced = False
    out: list[str] = []
    for line in lines:
        entry = _parse_line(line)
        if entry is not None and entry[0] == user:
            out.append(new_line)
            replaced = True
        else:
            out.append(line)
    if not replaced:
        out.append(new_line)
    _atomic_write(path, "".join(f"{line}\n" for line in out).encode("utf-8"))


def _atomic_write(path: str, data: bytes) -> None:
    """Write-temp, fsync, rename, fsync the directory (so the rename itself survives).

    Raises:
        OSError: any step failed; the temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    # mkstemp creates the file 0600 already; fchmod makes it explicit under any umask.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".users.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def authenticate(
    db: UserDb, user: str, password: str, executor: Executor | None = None
) -> bool:
    """Check `user`/`password` against `db` in `executor` (None: the loop's default).

    An unknown user still costs one scrypt run against a dummy hash of the same cost,
    so response timing does not reveal which user names exist.
    """
    loop = asyncio.get_running_loop()
    encoded = db.lookup(user)
    if encoded is None:
        await loop.run_in_executor(executor, verify_password, password, db.dummy_hash)
        return False
    return await loop.run_in_executor(executor, verify_password, password, encoded)
