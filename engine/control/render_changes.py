"""Human output of `volley ctl` for the commands that change something (render.py has
the rules every renderer follows: a reply read as plain JSON, a missing field shown
as "-"): the one-line answers of flush, suspend, resume, bounce, delete, throttle,
reload, shutdown, and the summary and progress lines of `drain` and `drain --to`.
"""

from __future__ import annotations

from engine.control.formats import DASH, Row, clip, moment, number, plural, rate, short_duration


def render_simple(cmd: str, reply: Row, now: float) -> str:
    """The one-line answers of the commands that change something."""
    if cmd == "flush":
        return _flush(reply, now)
    if cmd == "suspend":
        s = reply.get("suspension") or {}
        until = "until resumed" if s.get("until") is None else f"until {moment(s['until'], now)}"
        why = f": {s['reason']}" if s.get("reason") else ""
        return f"suspended {s.get('domain', DASH)} {until}{why}\n"
    if cmd == "resume":
        if not reply.get("resumed"):
            return "not suspended; nothing to resume\n"
        lifted = "".join(f"lifted {r.get('action')} of {r.get('provider')} (said: {clip(r.get('reply'))})\n"
                         for r in reply.get("lifted") or [])
        return f"{lifted}resumed; {plural(reply.get('released'), 'message')} released\n"
    if cmd in ("bounce", "delete"):
        return _bulk(cmd, reply)
    if cmd == "throttle":
        t = reply.get("throttle")
        if not t:
            return "throttle cleared\n"
        return (f"throttle {t.get('domain', DASH)}: max connections "
                f"{number(t.get('max_connections'))}, rate {rate(t.get('rate'))}\n")
    if cmd == "reload":
        kept = reply.get("kept") or []
        return (f"configuration reloaded from {reply.get('config') or DASH}\n"
                + (f"changed in the file but kept as started until a restart: {', '.join(kept)}\n"
                   if kept else ""))
    if cmd == "drain":
        return _drain(reply)
    if cmd == "shutdown":
        return "shutting down\n"
    raise KeyError(cmd)


def _bulk(cmd: str, reply: Row) -> str:
    verb = {"bounce": "bounced", "delete": "deleted"}[cmd]
    matched = reply.get("matched")
    if reply.get("dry_run"):
        return f"dry run: {plural(matched, 'message')} would be {verb}\n"
    took = reply.get("seconds")
    return f"{verb} {number(reply.get('done'))} of {plural(matched, 'matched message')}" + (
        f" in {took:.1f}s\n" if isinstance(took, (int, float)) else "\n")


def _flush(reply: Row, now: float) -> str:
    out = f"flushed {plural(reply.get('messages'), 'message')} (made due now)\n"
    for s in reply.get("held_by") or []:
        until = "until resumed" if s.get("until") is None else f"until {moment(s['until'], now)}"
        out += (f"{s.get('domain', DASH)} is suspended ({until}): the suspension still holds its "
                f"mail; volley ctl resume {s.get('domain', DASH)} releases it\n")
    return out


def handover_progress(reply: Row) -> str:
    """One line of a running `drain --to`."""
    return (f"{reply.get('stage', DASH)} to {reply.get('to', DASH)}: "
            f"{number(reply.get('handed_over'))} handed over, {number(reply.get('partial'))} partly, "
            f"{number(reply.get('refused'))} refused of {plural(reply.get('messages'), 'message')} "
            f"sent ({plural(reply.get('recipients'), 'recipient')})\n")


def _handover(reply: Row) -> str:
    """The summary of `drain --to`: every figure the run counted, and what it left."""
    out = (f"handover to {reply.get('to', DASH)} {reply.get('stage', DASH)} in "
           f"{short_duration(reply.get('seconds'))}: {plural(reply.get('messages'), 'message')} sent; "
           f"{number(reply.get('handed_over'))} handed over, {number(reply.get('partial'))} partly "
           f"(the rest of their recipients stay here), {number(reply.get('refused'))} refused; "
           f"{plural(reply.get('recipients'), 'recipient')} taken by the peer; "
           f"{plural(reply.get('left'), 'message')} left here\n")
    if reply.get("error"):
        out += f"stopped early: {reply['error']}\n"
    for line in reply.get("errors") or []:
        out += f"  {line}\n"
    if reply.get("left"):
        out += ("what is left stays queued here and is delivered from here; run "
                "volley ctl drain --to again to hand it over\n")
    return out


def _drain(reply: Row) -> str:
    if "to" in reply:
        return _handover(reply)
    drained, left = reply.get("drained"), reply.get("remaining")
    took = short_duration(reply.get("seconds"))
    if isinstance(drained, bool):
        head = "queue drained" if drained else "queue NOT drained (timed out)"
    else:
        head = f"drained {plural(drained, 'message')}"
    out = f"{head} in {took}; {plural(left, 'message')} remaining\n"
    if drained is False:
        out += "the server no longer accepts mail; " + (
            "delivery goes on: watch volley ctl status, stop with volley ctl shutdown\n"
            if reply.get("delivering", True) else
            "delivery is disabled in this configuration: the queue will not empty\n")
    return out
