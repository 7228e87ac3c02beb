"""What `triomilter check` prints and writes: the report, JSON, the delivered messages, diffs.

Plain functions over a finished `CheckReport` (no I/O but the files and
streams they are given); bytes are shown as `_display.show` does.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from typing import IO, Any

from ._check import CheckReport, MessageRecord, StepRecord, Verdict
from ._delivery import Delivery, Origin, split_lines, unified_diff
from ._display import flags_name, show, text_json
from .protocol import Actions, ProtocolOpts
from .testing import (
    AddHeader,
    AddRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    ReplaceSender,
)

_ARGS_WIDTH = 44
_LABEL = 9


# --- the text report --------------------------------------------------------------------


def _step_line(step: StepRecord) -> list[str]:
    args = " ".join(show(arg) for arg in step.args)
    if step.stage == "header" and len(step.args) == 2:
        args = f"{show(step.args[0])}: {show(step.args[1])}"
    if step.stage == "body":
        args = f"{show(step.args[0])} bytes" if step.args else ""
    if len(args) > _ARGS_WIDTH:
        args = args[: _ARGS_WIDTH - 1] + "…"
    lines = [f"  {step.stage:<{_LABEL}} {args:<{_ARGS_WIDTH}} {_outcome(step)}".rstrip()]
    if step.macros:
        macros = " ".join(f"{name}={show(value)}" for name, value in step.macros.items())
        lines.append(f"  {'':<{_LABEL}}   macros: {macros}")
    return lines


def _outcome(step: StepRecord) -> str:
    if not step.sent:
        return step.note or "not sent"
    parts = [f"→ {step.status}"]
    if step.reply:
        parts.append(show(step.reply))
    details = []
    if step.note and step.status != "NOREPLY":
        details.append(step.note)
    if step.ms is not None:
        details.append(f"{step.ms:.1f} ms")
    if details:
        parts.append(f"({', '.join(details)})")
    return " ".join(parts)


def _collapse(steps: Sequence[StepRecord]) -> Iterator[str]:
    """Each step's lines; a run of headers that were not sent is one line."""
    index = 0
    while index < len(steps):
        step = steps[index]
        if step.stage == "header" and not step.sent:
            end = index
            while end < len(steps) and steps[end].stage == "header" and not steps[end].sent:
                end += 1
            count = end - index
            label = f"{count} field{'s' if count != 1 else ''}"
            yield f"  {'header':<{_LABEL}} {label:<{_ARGS_WIDTH}} {step.note or 'not sent'}"
            index = end
            continue
        yield from _step_line(step)
        index += 1


def change_line(change: Modification) -> str:
    """One end-of-message change, as the report lists it."""
    match change:
        case AddHeader(name=name, value=value):
            return f"+ header     {show(name)}: {show(value)}"
        case InsertHeader(index=index, name=name, value=value):
            return f"+ header     {show(name)}: {show(value)}  (inserted at {index})"
        case ReplaceHeader(name=name, index=index, value=None):
            return f"- header     {show(name)} #{index}"
        case ReplaceHeader(name=name, index=index, value=str(value)):
            return f"~ header     {show(name)} #{index}: {show(value)}"
        case AddRecipient(rcpt=rcpt, esmtp_args=args):
            return f"+ recipient  {show(rcpt)}{' ' + show(args) if args else ''}"
        case RemoveRecipient(rcpt=rcpt):
            return f"- recipient  {show(rcpt)}"
        case ReplaceSender(sender=sender, esmtp_args=args):
            return f"~ sender     {show(sender)}{' ' + show(args) if args else ''}"
        case ReplaceBody(body=body, chunks=chunks):
            return f"~ body       replaced: {len(body)} bytes in {len(chunks)} chunk(s)"
        case Quarantine(reason=reason):
            return f"! quarantine {show(reason)}"
    return repr(change)  # pragma: no cover - every change is matched above


def render_text(report: CheckReport, out: IO[str], *, headers: bool = True) -> None:
    """The human report: per session and message, every step, the changes, the verdict."""
    write = out.write
    where = f"milter {report.milter!r} (in memory)" if report.in_memory else report.milter
    write(f"{where}, as {report.mta.title}\n")
    for number, session in enumerate(report.sessions):
        if number:
            write("\n(a new connection)\n")
        negotiation = session.negotiation
        version, actions, opts = negotiation.offer
        offer = f"version {version}, actions {actions:#x}, protocol {opts:#x}"
        write(f"  {'optneg':<{_LABEL}} offer: {offer}\n")
        if negotiation.version:
            write(
                f"  {'':<{_LABEL}} reply: version {negotiation.version}, actions "
                f"{flags_name(negotiation.actions, Actions)}, protocol "
                f"{flags_name(negotiation.opts, ProtocolOpts)}\n"
            )
            for stage, names in negotiation.macros.items():
                write(
                    f"  {'':<{_LABEL}} macros requested at {stage}: {' '.join(names) or '(none)'}\n"
                )
        for line in _collapse(session.steps):
            write(line + "\n")
        messages = [m for m in report.messages if m.session == number]
        for message in messages:
            _render_message(message, report, write, headers=headers)
        if session.error:
            write(f"  {'error':<{_LABEL}} {show(session.error)}\n")
    write(f"\nverdict: {report.verdict.value} (exit status {report.verdict.exit_status})\n")


def _render_message(
    message: MessageRecord, report: CheckReport, write: Any, *, headers: bool
) -> None:
    write(f"\nmessage {message.name}\n")
    for line in _collapse(message.steps):
        write(line + "\n")
    for number, change in enumerate(message.changes):
        write(f"  {'changes' if number == 0 else '':<{_LABEL}} {change_line(change)}\n")
    if message.progress:
        write(f"  {'':<{_LABEL}} ({message.progress} progress packet(s))\n")
    write(f"  {'verdict':<{_LABEL}} {_verdict(message)}\n")
    if message.reply:
        write(f"  {'':<{_LABEL}} the SMTP client is told: {show(message.reply)}\n")
    for rcpt, reply in message.refused:
        write(f"  {'':<{_LABEL}} recipient {show(rcpt)} refused: {show(reply)}\n")
    if message.error:
        write(f"  {'error':<{_LABEL}} {show(message.error)}\n")
    if message.delivery is not None:
        for note in message.delivery.notes:
            write(f"  {'':<{_LABEL}} note: {show(note)}\n")
        if headers:
            _render_delivery(message, message.delivery, report, write)


def _verdict(message: MessageRecord) -> str:
    verdict = message.verdict.value
    if message.decided_at not in (None, "EOM") and message.verdict is not Verdict.ERROR:
        verdict += f" at {message.decided_at}"
    if message.delivery is not None and message.delivery.quarantine is not None:
        verdict += f", quarantined: {show(message.delivery.quarantine)}"
    return verdict


def _render_delivery(
    message: MessageRecord, delivery: Delivery, report: CheckReport, write: Any
) -> None:
    envelope = delivery.envelope
    args = b"".join(b" " + arg for arg in envelope.sender_args)
    write(f"  {'delivered':<{_LABEL}} MAIL FROM:{show(envelope.sender + args)}\n")
    for rcpt, rcpt_args in envelope.recipients:
        args = b"".join(b" " + arg for arg in rcpt_args)
        write(f"  {'':<{_LABEL}}  RCPT TO:{show(rcpt + args)}\n")
    for entry in delivery.entries:
        if entry.origin is Origin.MTA:
            if entry.name.lower() == b"received":
                write(f"  {'':<{_LABEL}} . ({report.mta.title} adds its Received: header here)\n")
            continue
        mark = entry.origin.value
        raw = entry.raw if entry.raw is not None else entry.before
        if raw is None:
            continue
        if entry.origin is Origin.CHANGED and entry.before is not None:
            for line in split_lines(entry.before):
                write(f"  {'':<{_LABEL}} - {show(line)}\n")
        for line in split_lines(raw):
            write(f"  {'':<{_LABEL}} {mark} {show(line)}\n")
    body = (
        f"body replaced: {len(delivery.body)} bytes"
        if delivery.body is not None
        else f"body unchanged: {message.body_size} bytes"
    )
    write(f"  {'':<{_LABEL}}   ({body})\n")


def render_quiet(report: CheckReport, out: IO[str]) -> None:
    """One line per message (and per failed session)."""
    for message in report.messages:
        detail = f" at {message.decided_at}" if message.decided_at not in (None, "EOM") else ""
        count = len(message.changes)
        changes = f", {count} change{'s' if count != 1 else ''}" if count else ""
        reply = f": {show(message.reply)}" if message.reply else ""
        error = f": {show(message.error)}" if message.error else ""
        out.write(f"{message.name}: {message.verdict.value}{detail}{changes}{reply}{error}\n")
    for session in report.sessions:
        if session.error:
            out.write(f"error: {show(session.error)}\n")


# --- JSON -------------------------------------------------------------------------------


def _step_json(step: StepRecord) -> dict[str, Any]:
    return {
        "stage": step.stage,
        "args": [text_json(arg) for arg in step.args],
        "macros": step.macros,
        "sent": step.sent,
        "status": step.status,
        "reply": step.reply,
        "note": step.note,
        "ms": round(step.ms, 3) if step.ms is not None else None,
    }


def change_json(change: Modification) -> dict[str, Any]:
    match change:
        case AddHeader(name=name, value=value):
            return {"action": "add_header", "name": name, "value": value}
        case InsertHeader(index=index, name=name, value=value):
            return {"action": "insert_header", "index": index, "name": name, "value": value}
        case ReplaceHeader(name=name, index=index, value=value):
            return {"action": "replace_header", "name": name, "index": index, "value": value}
        case AddRecipient(rcpt=rcpt, esmtp_args=args):
            return {"action": "add_recipient", "rcpt": rcpt, "esmtp_args": args}
        case RemoveRecipient(rcpt=rcpt):
            return {"action": "remove_recipient", "rcpt": rcpt}
        case ReplaceSender(sender=sender, esmtp_args=args):
            return {"action": "replace_sender", "sender": sender, "esmtp_args": args}
        case ReplaceBody(body=body, chunks=chunks):
            return {"action": "replace_body", "size": len(body), "chunks": len(chunks)}
        case Quarantine(reason=reason):
            return {"action": "quarantine", "reason": reason}
    raise AssertionError(change)  # pragma: no cover


def _json_safe(value: Any) -> Any:
    """Text from the milter as JSON-safe strings (surrogates become ``\\xNN``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _delivery_json(message: MessageRecord, delivery: Delivery) -> dict[str, Any]:
    envelope = delivery.envelope
    return {
        "sender": text_json(envelope.sender),
        "sender_args": [text_json(arg) for arg in envelope.sender_args],
        "recipients": [
            {"rcpt": text_json(rcpt), "args": [text_json(arg) for arg in args]}
            for rcpt, args in envelope.recipients
        ],
        "headers": [
            {
                "name": text_json(entry.name),
                "field": text_json(entry.raw),
                "origin": entry.origin.name.lower(),
            }
            for entry in delivery.headers
            if entry.raw is not None
        ],
        "deleted": [
            text_json(entry.before)
            for entry in delivery.entries
            if entry.origin is Origin.DELETED and entry.before is not None
        ],
        "body_changed": delivery.body is not None,
        "body_size": len(delivery.body) if delivery.body is not None else message.body_size,
        "quarantine": delivery.quarantine,
        "notes": delivery.notes,
    }


def render_json(report: CheckReport, diffs: dict[int, bytes] | None = None) -> dict[str, Any]:
    """The whole report as one JSON-able document (see docs/tools.md)."""
    sessions = []
    for session in report.sessions:
        negotiation = session.negotiation
        version, actions, opts = negotiation.offer
        sessions.append(
            {
                "offer": {"version": version, "actions": actions, "protocol": opts},
                "negotiated": {
                    "version": negotiation.version,
                    "actions": negotiation.actions,
                    "actions_names": flags_name(negotiation.actions, Actions).split("|"),
                    "protocol": negotiation.opts,
                    "protocol_names": flags_name(negotiation.opts, ProtocolOpts).split("|"),
                    "macros": negotiation.macros,
                }
                if negotiation.version
                else None,
                "steps": [_step_json(step) for step in session.steps],
                "error": session.error,
            }
        )
    messages = []
    for number, message in enumerate(report.messages):
        entry: dict[str, Any] = {
            "name": message.name,
            "session": message.session,
            "verdict": message.verdict.value,
            "decided_at": message.decided_at,
            "reply": message.reply,
            "error": message.error,
            "envelope": {
                "sender": text_json(message.envelope.sender),
                "recipients": [text_json(rcpt) for rcpt, _ in message.envelope.recipients],
                "refused": [
                    {"rcpt": text_json(rcpt), "reply": reply} for rcpt, reply in message.refused
                ],
            },
            "steps": [_step_json(step) for step in message.steps],
            "changes": [change_json(change) for change in message.changes],
            "progress": message.progress,
            "delivered": _delivery_json(message, message.delivery)
            if message.delivery is not None
            else None,
        }
        if diffs is not None:
            entry["diff"] = text_json(diffs.get(number, b""))
        messages.append(entry)
    document = {
        "milter": report.milter,
        "in_memory": report.in_memory,
        "mta": report.mta.value,
        "verdict": report.verdict.value,
        "exit_status": report.verdict.exit_status,
        "sessions": sessions,
        "messages": messages,
    }
    return dict(_json_safe(document))


# --- the delivered message -------------------------------------------------------------------


def _original_body(message: MessageRecord) -> bytes:
    if message.body is None:
        return b""
    message.body.seek(0)
    return message.body.read()


def write_delivered(message: MessageRecord, out: IO[bytes]) -> None:
    """Write the message as delivered: headers, the empty line, the (new) body."""
    delivery = message.delivery
    assert delivery is not None
    out.write(delivery.header_bytes())
    out.write(message.separator)
    if delivery.body is not None:
        out.write(delivery.body)
    elif message.body is not None:
        message.body.seek(0)
        shutil.copyfileobj(message.body, out)


_MBOX_FROM = re.compile(rb"^(>*From )", re.M)


def write_mbox(messages: Sequence[MessageRecord], out: IO[bytes]) -> None:
    """Write delivered messages as an mbox (mboxrd quoting of ``From`` lines)."""
    import io

    for message in messages:
        assert message.delivery is not None
        sender = message.delivery.envelope.sender.strip(b"<>") or b"MAILER-DAEMON"
        out.write(b"From " + sender + b" Thu Jan  1 00:00:00 1970\n")
        buffer = io.BytesIO()
        write_delivered(message, buffer)
        data = _MBOX_FROM.sub(rb">\1", buffer.getvalue())
        out.write(data)
        if not data.endswith(b"\n"):
            out.write(b"\n")
        out.write(b"\n")


def output_name(message: MessageRecord, number: int) -> str:
    """A file name for a message written into an ``--output`` directory."""
    base = os.path.basename(message.name.replace("#", "-")) or "message"
    base = "stdin" if base == "-" else base
    return f"{number:03d}-{re.sub(r'[^A-Za-z0-9._-]', '_', base)}"


def diff_message(message: MessageRecord, mta_title: str) -> bytes:
    """A unified diff of the message as read against the message as delivered."""
    delivery = message.delivery
    if delivery is None:
        return b""
    old_head = [line for f in message.fields for line in split_lines(f.raw)]
    new_head = split_lines(delivery.header_bytes())
    separator = [b""] if message.separator else []
    if delivery.body is None:
        # The body is the same: three lines of it are context enough.
        head = _first_lines(message, 3)
        old_body = new_body = head
    else:
        old_body = split_lines(_original_body(message))
        new_body = split_lines(delivery.body)
    name = message.name.encode("utf-8", "surrogateescape")
    lines = unified_diff(
        old_head + separator + old_body,
        new_head + separator + new_body,
        name,
        name + f"\t(as {mta_title} delivers it)".encode(),
    )
    return b"".join(lines)


def _first_lines(message: MessageRecord, count: int) -> list[bytes]:
    if message.body is None:
        return []
    message.body.seek(0)
    lines = []
    for _ in range(count):
        line = message.body.readline()
        if not line:
            break
        lines.append(line.rstrip(b"\n").removesuffix(b"\r"))
    return lines
