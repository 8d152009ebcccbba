"""delivery/dsn: RFC 3464 structure, NOTIFY/RET rules, wire hygiene (P5)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.delivery.dsn import _field, build_dsn, dsn_wanted, success_action
from engine.delivery.outcome import expiry_reply
from engine.queue.records import MessageRecord, Recipient
from engine.smtp.replies import Reply

T0 = 1_700_000_000.0
ORIGINAL = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: rcpt@example.com\r\n"
    b"Subject: Weekly newsletter\r\n"
    b"Message-ID: <orig@example.org>\r\n"
    b"\r\n"
    b"BODY-LINE-ONE\r\n"
    b"BODY-LINE-TWO\r\n"
)
UNKNOWN = Reply(550, "5.1.1", "<rcpt@example.com>: Recipient address rejected: User unknown")


def record(**kw: object) -> MessageRecord:
    r = MessageRecord(b"\xab\xcd", "sender@example.org", [Recipient("rcpt@example.com", attempts=1)], T0, len(ORIGINAL))
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def build(r: MessageRecord, entries: list[tuple[Recipient, Reply, str]] | None = None,
          original: bytes = ORIGINAL, **kw: object) -> bytes | None:
    if entries is None:
        entries = [(r.recipients[0], UNKNOWN, "failed")]
    args: dict[str, object] = {"reporting_mta": "relay.example.net", "now": T0 + 3600,
                               "message_id": "dsn1@relay.example.net"}
    args.update(kw)
    return build_dsn(r, original, entries, **args)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return cast(list[EmailMessage], payload)


def status_blocks(msg: EmailMessage) -> list[Message]:
    part = parts(msg)[1]
    assert part.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return cast(list[Message], blocks)


def assert_wire_clean(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    rest = raw.replace(b"\r\n", b"")
    assert b"\r" not in rest and b"\n" not in rest, "bare CR or LF (P5)"
    assert max(len(x) for x in raw.split(b"\r\n")) <= 998


def test_structure_of_a_failure() -> None:
    raw = build(record())
    assert raw is not None
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
    assert msg["To"].addresses[0].addr_spec == "sender@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<dsn1@relay.example.net>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime.timestamp() == T0 + 3600
    ps = parts(msg)
    assert [p.get_content_type() for p in ps] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "rcpt@example.com" in ps[0].get_content()
    per_msg, per_rcpt = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; relay.example.net"
    assert per_msg["Arrival-Date"] is not None
    assert per_msg["Original-Envelope-Id"] is None
    assert per_rcpt["Final-Recipient"] == "rfc822; rcpt@example.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Original-Recipient"] is None
    assert per_rcpt["Remote-MTA"] is None
    assert UNKNOWN.text in per_rcpt["Diagnostic-Code"]  # verbatim
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 ")
    assert per_rcpt["Last-Attempt-Date"] is not None
    # default RET: headers only; the body never comes back
    assert b"Subject: Weekly newsletter" in raw
    assert b"BODY-LINE-ONE" not in raw


def test_ret_full_returns_message() -> None:
    raw = build(record(ret="FULL"))
    assert raw is not None
    assert_wire_clean(raw)
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert parts(returned)[0]["Subject"] == "Weekly newsletter"
    assert b"BODY-LINE-TWO\r\n" in raw


def test_ret_hdrs_and_full_with_bare_lf_fall_back_to_headers() -> None:
    raw = build(record(ret="HDRS"))
    assert raw is not None and b"BODY-LINE-ONE" not in raw
    dirty = ORIGINAL + b"binary\nbare LF\r\n"
    raw = build(record(ret="FULL"), original=dirty)
    assert raw is not None
    assert_wire_clean(raw)
    assert parts(parse(raw))[2].get_content_type() == "text/rfc822-headers"
    notice = " ".join(parts(parse(raw))[0].get_content().split())
    assert "only its headers are returned" in notice


def test_envid_orcpt_remote_mta_echoed() -> None:
    r = record(envid="QQ314159+2Bx")
    r.recipients[0].orcpt = "rfc822;rcpt+2Btag@example.com"
    raw = build(r, remote_mta="mx1.example.com")
    assert raw is not None
    per_msg, per_rcpt = status_blocks(parse(raw))
    assert per_msg["Original-Envelope-Id"] == "QQ314159+x"  # xtext decoded
    assert per_rcpt["Original-Recipient"] == "rfc822; rcpt+tag@example.com"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.example.com"


def test_orcpt_with_encoded_crlf_cannot_inject() -> None:
    r = record(envid="x+0D+0AFinal-Recipient:+20evil")
    r.recipients[0].orcpt = "rfc822;a+0D+0AAction:+20delivered"
    raw = build(r)
    assert raw is not None
    assert_wire_clean(raw)
    per_msg, per_rcpt = status_blocks(parse(raw))
    assert per_msg["Original-Envelope-Id"] == "x+0D+0AFinal-Recipient:+20evil"  # kept as xtext
    assert per_rcpt.get_all("Action") == ["failed"]


@pytest.mark.parametrize(
    "sender, notify, action, due",
    [
        ("", None, "failed", False),  # never bounce a bounce
        ("s@example.org", ("NEVER",), "failed", False),
        ("s@example.org", ("SUCCESS", "DELAY"), "failed", False),
        ("s@example.org", ("FAILURE",), "failed", True),
        ("s@example.org", ("failure",), "failed", True),
        ("s@example.org", None, "failed", True),
        ("s@example.org", None, "delayed", False),  # default NOTIFY is FAILURE only
        ("s@example.org", ("DELAY",), "delayed", True),
        ("s@example.org", ("SUCCESS",), "relayed", True),
        ("s@example.org", ("FAILURE",), "relayed", False),
        ("", ("SUCCESS",), "relayed", False),
    ],
)
def test_when_a_dsn_is_due(sender: str, notify: tuple[str, ...] | None, action: str, due: bool) -> None:
    r = record(sender=sender)
    r.recipients[0].notify = notify
    assert (build(r, [(r.recipients[0], UNKNOWN, action)]) is not None) is due
    if sender:
        assert dsn_wanted(r.recipients[0], action) is due


def test_unknown_action() -> None:
    with pytest.raises(ValueError):
        dsn_wanted(Recipient("a@b"), "bounced")


def test_only_wanted_recipients_reported() -> None:
    r = record(recipients=[Recipient("a@example.com", notify=("NEVER",)), Recipient("b@example.com")])
    raw = build(r, [(x, UNKNOWN, "failed") for x in r.recipients])
    assert raw is not None
    blocks = status_blocks(parse(raw))
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; b@example.com"]


def test_delay_and_relayed_reports() -> None:
    r = record()
    r.recipients[0].notify = ("DELAY", "SUCCESS")
    busy = Reply(451, "4.2.0", "mailbox busy")
    raw = build(r, [(r.recipients[0], busy, "delayed")], retry_until=T0 + 5 * 86400)
    assert raw is not None
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    rb = status_blocks(msg)[1]
    assert (rb["Action"], rb["Status"]) == ("delayed", "4.2.0")
    assert rb["Will-Retry-Until"] is not None
    assert success_action(True) is None and success_action(False) == "relayed"
    raw = build(r, [(r.recipients[0], Reply(250, "2.0.0", "queued"), "relayed")])
    assert raw is not None
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert status_blocks(msg)[1]["Action"] == "relayed"


def test_expired_recipient_reports_547_and_last_reply() -> None:
    r = record()
    raw = build(r, [(r.recipients[0], expiry_reply("451 4.2.0 mailbox busy"), "failed")])
    assert raw is not None
    rb = status_blocks(parse(raw))[1]
    assert rb["Status"] == "5.4.7"
    assert "last reply: 451 4.2.0 mailbox busy" in rb["Diagnostic-Code"]


def test_huge_remote_reply_is_folded() -> None:
    words = " ".join(f"word{i}" for i in range(1000))[:5000]  # 5,000 characters with spaces
    blob = "x" * 5000  # 5,000 characters, no space at all
    multi = ("line one", "y" * 3000, "line three")
    spaces = ("a" * 790 + " " * 2000) * 3 + "end"
    for text, lossless in ((words, True), (blob, False), (multi, False), (spaces, False)):
        raw = build(record(), [(record().recipients[0], Reply(550, "5.7.1", text), "failed")])
        assert raw is not None
        assert_wire_clean(raw)
        diag = status_blocks(parse(raw))[1]["Diagnostic-Code"]
        flat = text if isinstance(text, str) else " ".join(text)
        if lossless:
            assert flat in diag  # folding at spaces loses nothing
        else:
            # a space-free run over 900 octets is split by CRLF SP: only spaces are added
            assert flat.replace(" ", "") in diag.replace(" ", "")


def test_remote_text_with_control_characters() -> None:
    evil = "rejected\r\nAction: delivered\x00\x1b"
    raw = build(record(), [(record().recipients[0], Reply(550, "5.7.1", evil), "failed")])
    assert raw is not None
    assert_wire_clean(raw)
    assert status_blocks(parse(raw))[1].get_all("Action") == ["failed"]


def test_smtputf8_keeps_addresses() -> None:
    r = record(sender="expéditeur@exemple.fr", smtputf8=True, recipients=[Recipient("用户@例子.中国", attempts=1)])
    raw = build(r, [(r.recipients[0], UNKNOWN, "failed")], original="Subject: héllo\r\n\r\nbody\r\n".encode())
    assert raw is not None
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert "To: <expéditeur@exemple.fr>\r\n".encode() in raw  # raw UTF-8, RFC 6532
    # email.message_from_bytes reads 8-bit headers as surrogates; parse the UTF-8 text
    text_msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert text_msg["To"].addresses[0].addr_spec == "expéditeur@exemple.fr"
    assert [p.get_content_type() for p in parts(msg)][1:] == [
        "message/global-delivery-status", "message/global-headers"]
    assert "Final-Recipient: utf-8; 用户@例子.中国".encode() in raw


def test_non_utf8_message_stays_ascii() -> None:
    raw = build(record(), [(record().recipients[0], Reply(550, "5.7.1", "refusé"), "failed")])
    assert raw is not None
    assert all(b < 0x80 for b in raw)


def test_boundary_not_in_content() -> None:
    raw = build(record())
    assert raw is not None
    boundary = parse(raw).get_boundary()
    assert boundary is not None
    original = ORIGINAL.replace(b"BODY-LINE-ONE", b"--" + boundary.encode())
    raw2 = build(record(ret="FULL"), original=original)
    assert raw2 is not None
    msg = parse(raw2)
    assert msg.get_boundary() != boundary
    assert len(parts(msg)) == 3


def test_headers_only_original_without_body() -> None:
    raw = build(record(), original=b"Subject: x\r\nFrom: a@b")
    assert raw is not None
    assert_wire_clean(raw)
    assert b"From: a@b\r\n" in raw


@settings(max_examples=150)
@given(
    st.text(min_size=0, max_size=3000),
    st.binary(max_size=2000),
    st.sampled_from([None, "FULL", "HDRS"]),
)
def test_always_wire_clean(reply_text: str, original: bytes, ret: str | None) -> None:
    r = record(ret=ret)
    raw = build(r, [(r.recipients[0], Reply(550, "5.0.0", reply_text), "failed")], original=original)
    assert raw is not None
    assert_wire_clean(raw)
    assert len(parts(parse(raw))) == 3


@given(st.text(alphabet=" xé", max_size=6000))
def test_field_folding_bounds(value: str) -> None:
    lines = _field("Diagnostic-Code", value)
    assert lines[0].startswith("Diagnostic-Code:")
    assert all(len(line.encode("utf-8")) <= 998 for line in lines)
    assert all(line.strip() for line in lines)  # no whitespace-only line (RFC 5322 §3.2.2)
    assert all(line.startswith(" ") for line in lines[1:])
    assert "".join(lines)[len("Diagnostic-Code:") :].replace(" ", "") == value.replace(" ", "")
