"""`volley ctl suppress` against a real `volley serve`: add, remove, list, import of a
100,000-line file (counted back by export and list), tenants kept apart, bad lines
reported by number, and the list surviving a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.control.protocol import MAX_VALUES
from tests.integration.control_helpers import ask, ctl, ctl_json

pytestmark = pytest.mark.timeout(300)


def exported(server, *args: str) -> list[str]:
    lines = ctl(server, "suppress", "export", *args).stdout.splitlines()
    assert lines[0].startswith("# volley suppression list")
    return lines[1:]


def test_add_list_remove(serve):
    server = serve()
    out = ctl(server, "suppress", "add", "Bob@Example.COM").stdout
    assert out == "added 1, already present 0, bad 0\n"
    ctl(server, "suppress", "add", "spam.example", "--reason", "complaint")
    again = ctl_json(server, "suppress", "add", "BOB@example.com")
    assert (again["added"], again["present"]) == (0, 1)
    ctl(server, "suppress", "add", "a@x.example", "--tenant", "acme")
    reply = ctl_json(server, "suppress", "list")
    rows = [(e["tenant"], e["value"], e["kind"], e["reason"]) for e in reply["entries"]]
    assert rows == [("", "bob@example.com", "address", "manual"),
                    ("", "spam.example", "domain", "complaint"),
                    ("acme", "a@x.example", "address", "manual")]
    assert reply["total"] == 3 and reply["next"] == ""
    assert all(e["created"] > 0 and e["source"] == "ctl" for e in reply["entries"])
    table = ctl(server, "suppress", "list").stdout.splitlines()
    assert table[0].split() == ["VALUE", "KIND", "REASON", "SOURCE", "TENANT", "CREATED"]
    assert table[1].split()[:5] == ["bob@example.com", "address", "manual", "ctl", "(all)"]
    assert table[-1] == "3 entries on the list (every tenant)"
    # removal is per tenant and case-insensitive
    assert ctl(server, "suppress", "remove", "a@X.example").stdout == (
        "not on the list; nothing removed\n")
    assert ctl_json(server, "suppress", "remove", "a@X.example", "--tenant", "acme")["removed"]
    assert ctl_json(server, "suppress", "remove", "SPAM.example")["removed"] is True
    assert [e["value"] for e in ctl_json(server, "suppress", "list")["entries"]] == [
        "bob@example.com"]


def test_bad_input_is_named(serve):
    server = serve()
    for args, words in [
        (("add", "x@"), "empty domain"), (("add", "@x.example"), "empty local part"),
        (("add", "a@x.example", "--reason", "because"), "--reason: expected one of"),
        (("add", "a@x.example", "--tenant", "a b"), "tenant:"),
        (("list", "--limit", "0"), "expected 1..10000"),
        (("import", "/nonexistent/file"), "No such file"),
    ]:
        proc = ctl(server, "suppress", *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    # the server refuses the same things by name when a client skips the checks
    path = str(server.config_path.parent / "volley.sock")
    bad = ask(path, {"cmd": "suppress_add", "values": ["ok@x.example", "bad@"], "tenant": "t"})
    assert bad["ok"] and bad["added"] == 1
    assert bad["bad"] == [{"index": 1, "value": "bad@", "error": "'bad@': empty domain"}]
    too_many = ask(path, {"cmd": "suppress_add", "values": ["a@b.c"] * (MAX_VALUES + 1)})
    assert too_many["ok"] is False and "at most 10000" in too_many["error"]
    reason = ask(path, {"cmd": "suppress_add", "values": ["a@b.c"], "reason": "x"})
    assert reason["ok"] is False and "reason: expected one of" in reason["error"]
    assert ask(path, {"cmd": "suppress_remove", "value": ""})["error"] == "empty value"


def test_import_of_100000_lines_counted_back_by_export_and_list(serve, tmp_path: Path):
    server = serve()
    values = [f"user{i}@d{i % 97}.example" for i in range(100_000)]
    lines = ["# the newsletter's hard bounces", ""]
    for i, v in enumerate(values):
        lines.append(v.upper() if i % 10 == 0 else v)  # case folds to one entry
        if i == 500:
            lines += ["not an address@x.example", "   ", "USER0@d0.example", "d.example"]
    path = tmp_path / "list.txt"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    proc = ctl(server, "suppress", "import", str(path))
    assert proc.stdout == "added 100001, already present 1, bad 2\n"
    bad_line = lines.index("not an address@x.example") + 1
    assert (f"list.txt:{bad_line}: skipped: 'not an address@x.example': a space in the local "
            "part (unquoted)") in proc.stderr
    assert f"list.txt:{len(lines) + 1}: skipped: not UTF-8" in proc.stderr
    got = exported(server)
    assert sorted(got) == sorted([*values, "d.example"])
    listed, after = [], ""
    while True:
        reply = ctl_json(server, "suppress", "list", "--tenant", "", "--limit", "10000",
                         *(("--after", after) if after else ()))
        listed += [e["value"] for e in reply["entries"]]
        assert all(e["reason"] == "import" and e["source"] == "list.txt" for e in reply["entries"])
        after = reply["next"]
        if not after:
            break
    assert listed == got and reply["total"] == 100_001
    # the export is re-importable: everything is already there
    (tmp_path / "again.txt").write_text("\n".join(got) + "\n")
    again = json.loads(ctl(server, "--json", "suppress", "import", str(tmp_path / "again.txt")).stdout)
    assert (again["added"], again["present"], again["bad"]) == (0, 100_001, [])


def test_tenants_are_kept_apart(serve, tmp_path: Path):
    server = serve()
    (tmp_path / "acme.txt").write_text("a@x.example\nacme-only.example\n")
    assert ctl(server, "suppress", "import", str(tmp_path / "acme.txt"), "--tenant", "acme",
               "--reason", "unsubscribe").stdout == "added 2, already present 0, bad 0\n"
    ctl(server, "suppress", "add", "a@x.example", "--tenant", "globex")
    ctl(server, "suppress", "add", "shared.example")
    assert exported(server, "--tenant", "acme") == ["a@x.example", "acme-only.example"]
    assert exported(server, "--tenant", "globex") == ["a@x.example"]
    assert exported(server) == ["shared.example"]
    acme = ctl_json(server, "suppress", "list", "--tenant", "acme")["entries"]
    assert {(e["tenant"], e["reason"]) for e in acme} == {("acme", "unsubscribe")}
    # paging over every tenant: --after names the tenant of the last row
    first = ctl_json(server, "suppress", "list", "--limit", "2")
    assert [(e["tenant"], e["value"]) for e in first["entries"]] == [
        ("", "shared.example"), ("acme", "a@x.example")]
    assert (first["next"], first["next_tenant"]) == ("a@x.example", "acme")
    assert "--after a@x.example --after-tenant acme" in ctl(
        server, "suppress", "list", "--limit", "2").stdout
    rest = ctl_json(server, "suppress", "list", "--after", "a@x.example", "--after-tenant", "acme")
    assert [(e["tenant"], e["value"]) for e in rest["entries"]] == [
        ("acme", "acme-only.example"), ("globex", "a@x.example")]


def test_the_list_survives_a_restart(serve, tmp_path: Path):
    first = serve()
    (tmp_path / "l.txt").write_text("".join(f"u{i}@r.example\n" for i in range(25_000)))
    assert ctl(first, "suppress", "import", str(tmp_path / "l.txt")).stdout.startswith("added 25000,")
    ctl(first, "suppress", "add", "gone.example", "--tenant", "t")
    before = exported(first)
    assert first.stop() == 0
    second = serve({"queue": {"path": str(first.config_path.parent / "queue")}})
    assert exported(second) == before and len(before) == 25_000
    assert exported(second, "--tenant", "t") == ["gone.example"]
    assert ctl_json(second, "suppress", "list", "--limit", "1")["total"] == 25_001
