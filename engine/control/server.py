"""The control socket: a Unix stream socket served by the supervisor.

One JSON request per line, one JSON reply per line (engine/control/protocol.py); a
connection may carry any number of requests, answered in order. Nothing a client
sends can drop the connection or hurt the server: bad JSON, an unknown command or a
bad argument gets {"ok": false, "error": ...}; only a line longer than MAX_LINE ends
the connection (after saying so), since its end cannot be found.

Access is the socket file's mode: 0600 (the owner only), or 0660 with
`control.group`. The socket is created under a umask so it never exists with a wider
mode, not even between bind() and chmod() (P10). The kernel's word on each peer
(SO_PEERCRED) is checked as well, so a mode widened by hand, or a socket reached some
other way, still lets in only root, this server's own user and, with `control.group`,
that group's members: anyone else gets one error line and the connection ends.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from engine.control import protocol
from engine.control.replies import Failure, Reply, encode_reply
from engine.observe import log

Handler = Callable[[protocol.AnyRequest, str], Awaitable[Reply]]
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7) SO_PEERCRED)


class Access:
    """Who may use the control socket: root, our own user, and members of `gid`."""

    def __init__(self, gid: int | None) -> None:
        self.uids = {0, os.geteuid()}
        self.gid = gid

    def allows(self, uid: int, gid: int) -> bool:
        if uid in self.uids:
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:  # supplementary groups: looked up on connect only, never per request
            return self.gid in os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
        except (KeyError, OSError):
            return False


class ControlSocketError(Exception):
    """The control socket cannot be created; the message says why, for the operator."""


def _check_stale(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse anything else at the path."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"control.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlSocketError(f"control.socket: cannot probe {path}: {err.strerror}") from None
        path.unlink(missing_ok=True)  # stale: left by a process that died
        return
    finally:
        probe.close()
    raise ControlSocketError(f"control.socket: {path} is in use (is another volley running?)")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ControlSocketError(f"control.group: no such group {name!r}") from None


async def start_control_server(path: str, group: str, handle: Handler) -> asyncio.AbstractServer:
    """Create the socket at `path` and serve requests through `handle`.

    Raises:
        ControlSocketError: the path is taken, not a socket, or cannot be created.
    """
    where = Path(path)
    gid = _group_id(group) if group else None
    where.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if gid is not None else 0o700)
    _check_stale(where)
    mode = 0o660 if gid is not None else 0o600
    old = os.umask(0o777 & ~mode)
    try:
        access = Access(gid)
        server = await asyncio.start_unix_server(
            lambda r, w: _serve(r, w, handle, access), path=str(where), limit=protocol.MAX_LINE)
    except OSError as err:
        raise ControlSocketError(f"control.socket: cannot create {where}: {err.strerror}") from None
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(where, -1, gid)
    os.chmod(where, mode)
    return server


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the other end, from the kernel (SO_PEERCRED); None if unknown."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, AttributeError, struct.error):
        return None
    return pid, uid, gid


def peer_name(writer: asyncio.StreamWriter) -> str:
    """Who is on the other end, from the kernel (SO_PEERCRED): "user (pid N)". Saved
    with suspensions and logged with every change, so "who suspended this" has an answer."""
    creds = peer_credentials(writer)
    if creds is None:
        return "unknown"
    pid, uid, _ = creds
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    return f"{user} (pid {pid})"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handle: Handler, access: Access) -> None:
    creds = peer_credentials(writer)
    if creds is None or not access.allows(creds[1], creds[2]):
        who = "unknown peer" if creds is None else f"uid {creds[1]} (pid {creds[0]})"
        log.warning("control_refused", peer=who)
        writer.write(_error(f"{who} may not use the control socket"))
        writer.close()
        return
    peer = peer_name(writer)
    try:
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(_error(f"request longer than {protocol.MAX_LINE} bytes"))
                break
            if not line:
                break
            if not line.strip():
                continue
            writer.write(await _answer(line, handle, peer))
            await writer.drain()
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        writer.close()


async def _answer(line: bytes, handle: Handler, peer: str) -> bytes:
    try:
        req = protocol.decode_request(line)
    except protocol.RequestError as err:
        return _error(str(err))
    try:
        return encode_reply(await handle(req, peer))
    except protocol.RequestError as err:
        return _error(str(err))
    except Exception as err:  # a handler bug answers, it never kills the supervisor
        log.error("control_command_failed", cmd=type(req).__name__.lower(), error=repr(err))
        return _error(f"internal error: {err!r}")


def _error(text: str) -> bytes:
    return encode_reply(Failure(error=text))
