"""Who may use the control socket, and what a request can reach (P10), against a real
`volley serve`.

The socket's file mode is the first gate (test_control_socket.py); these tests widen
the mode by hand, as a careless operator might, to show the kernel-checked peer
credentials still keep other users out. And no request names a path: a request can
neither choose a file to read or write nor smuggle one in through a field.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.control import protocol
from tests.integration.control_helpers import ask
from tests.integration.test_control_socket import _connect_as

NOBODY = 65534  # nobody:nogroup on Debian
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")


def _open_socket(serve: Any, group: str = "") -> tuple[Any, Path]:
    where = Path(tempfile.mkdtemp(prefix="vctl", dir="/tmp"))
    where.chmod(0o711)  # anyone may traverse: only the socket and the peer check decide
    sock = where / "volley.sock"
    server = serve({"control": {"socket": str(sock), "group": group}})
    sock.chmod(0o666)  # the mistake: the file mode no longer keeps anyone out
    return server, sock


@needs_root
def test_another_user_is_refused_even_when_the_mode_lets_them_connect(serve: Any) -> None:
    server, sock = _open_socket(serve)
    got = _connect_as(NOBODY, NOBODY, str(sock))
    reply = json.loads(got)
    assert reply["ok"] is False and "uid 65534" in reply["error"] and "may not use" in reply["error"]
    assert ask(sock, {"cmd": "status"})["ok"] is True  # the owner still may
    refused = server.wait_for(lambda e: e.get("event") == "control_refused")
    assert "uid 65534" in refused["peer"]
    server.stop()


@needs_root
def test_a_member_of_the_control_group_is_let_in(serve: Any) -> None:
    server, sock = _open_socket(serve, group="nogroup")
    got = _connect_as(NOBODY, NOBODY, str(sock))  # (the first 100 bytes of the reply)
    assert got.startswith('{"ok":true'), got
    server.stop()


def test_no_request_field_names_a_path() -> None:
    """Every request and every field, read from the protocol itself: none may carry a
    file name, so no request can point the server at a path of its choosing."""
    words = ("path", "file", "dir", "socket", "config", "log", "output", "dest")
    fields = {
        (tag.__name__, name)
        for tag in protocol.Request.__subclasses__() + protocol.Filter.__subclasses__()
        for name in tag.__struct_fields__
    }
    assert fields  # the walk found the requests
    assert [f for f in fields if any(w in f[1].lower() for w in words)] == []


@pytest.mark.parametrize("line", [
    {"cmd": "reload", "path": "/etc/passwd"},
    {"cmd": "reload", "config": "/tmp/evil.toml"},
    {"cmd": "status", "log": "/tmp/x"},
    {"cmd": "drain", "socket": "/tmp/x"},
])
def test_a_smuggled_path_field_is_refused_by_name(line: dict[str, str]) -> None:
    with pytest.raises(protocol.RequestError) as err:
        protocol.decode_request(msgspec.json.encode(line))
    extra = next(k for k in line if k != "cmd")
    assert extra in str(err.value)


def test_path_like_values_have_no_file_effect(serve: Any, tmp_path: Path) -> None:
    server = serve()
    sock = server.config_path.parent / "volley.sock"
    canary = tmp_path / "canary"
    before = sorted(p.name for p in server.config_path.parent.rglob("*"))
    for req in [
        {"cmd": "suspend", "domain": str(canary), "duration": 60, "reason": f"../../{canary.name}"},
        {"cmd": "resume", "domain": str(canary)},
        {"cmd": "flush", "domain": f"../{canary.name}"},
        {"cmd": "show", "id": str(canary)},
        {"cmd": "list", "sender": str(canary), "after": "../../etc/passwd"},
        {"cmd": "mx", "domain": "/etc/passwd"},
        {"cmd": "delete", "domain": str(canary)},
    ]:
        reply = ask(sock, req)
        assert isinstance(reply["ok"], bool)  # answered, one way or the other
    assert not canary.exists()
    after = sorted(p.name for p in server.config_path.parent.rglob("*"))
    assert [n for n in after if n not in before and canary.name in n] == []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # the server is unharmed
        s.settimeout(30)
        s.connect(str(sock))
    server.stop()
