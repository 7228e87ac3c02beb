"""The ``triomilter check`` command line: options in, a report and an exit status out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import IO, Any

import trio

from ._check import EXIT_STATUS, CheckOptions, CheckReport, MessageRecord, Verdict
from ._check import parse_client_address as _parse_client_address
from ._check_output import (
    diff_message,
    output_name,
    render_json,
    render_quiet,
    render_text,
    write_delivered,
    write_mbox,
)
from ._check_run import run_check
from ._delivery import Mta
from ._mail import MessageError
from ._milter import Milter
from ._sockets import SocketSpecError, parse_socket_spec

EXIT_USAGE = 2

DESCRIPTION = """\
Run messages through a milter like Postfix or Sendmail would, without an MTA:
the milter given as MODULE[:ATTR] runs in this process; --connect talks to
a running milter of any implementation. Prints each stage sent, the milter's
replies, the end-of-message changes and the message as delivered.
"""

EPILOG = f"""\
messages: files (one message each, or an mbox), directories (their files),
or - for standard input; CRLF or LF line ends. Several messages run on one
connection, like an MTA reusing it. Without a message, only the negotiation,
CONNECT and HELO run.

defaults: the client is the first Received: header's (not loopback), else
localhost [127.0.0.1]; the sender is the mbox From line's, Return-Path: or
From:; the recipients are To:, Cc: and Bcc:.

exit status (with several messages, the most severe):
  {EXIT_STATUS[Verdict.ACCEPTED]}  accepted (changed, quarantined or not)
  {EXIT_STATUS[Verdict.REJECTED]}  rejected (5xx)
  {EXIT_USAGE}  usage error: bad options, a milter or message that cannot be read
  {EXIT_STATUS[Verdict.TEMPFAILED]}  tempfailed (4xx)
  {EXIT_STATUS[Verdict.DISCARDED]}  discarded
  {EXIT_STATUS[Verdict.ERROR]}  milter error: protocol violation, closed connection, timeout,
     unreachable, handler panic
"""


def add_check_parser(commands: Any) -> None:
    """The ``check`` subcommand's options (``commands`` is argparse's subparsers object)."""
    check: argparse.ArgumentParser = commands.add_parser(
        "check",
        help="run messages through a milter, without an MTA",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] (MODULE[:ATTR] | --connect SPEC) [MESSAGE ...]",
    )
    check.add_argument("args", nargs="*", metavar="MODULE[:ATTR] MESSAGE", help=argparse.SUPPRESS)
    check.add_argument(
        "--connect",
        "-c",
        metavar="SPEC",
        help="a running milter: inet:PORT@HOST, inet6:PORT@HOST or unix:/path",
    )
    check.add_argument(
        "--mta",
        choices=[mta.value for mta in Mta],
        default=Mta.POSTFIX.value,
        help="the MTA to imitate: its offer, macros and header semantics (postfix)",
    )
    envelope = check.add_argument_group("envelope and client (default: from the headers)")
    envelope.add_argument("--from", dest="sender", metavar="'ADDR [ARG...]'", help="MAIL FROM")
    envelope.add_argument(
        "--rcpt",
        action="append",
        default=[],
        metavar="'ADDR [ARG...]'",
        help="RCPT TO (repeat for several)",
    )
    envelope.add_argument("--client-name", metavar="NAME", help="the client's host name")
    envelope.add_argument(
        "--client-address",
        metavar="ADDR",
        help="IP[:PORT], [IPv6]:PORT, unix:/path or unknown",
    )
    envelope.add_argument("--helo", metavar="NAME", help="the HELO/EHLO name")
    envelope.add_argument(
        "--macro",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a macro value (repeat); NAME= removes one",
    )
    output = check.add_argument_group("output")
    output.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the delivered message(s): a file (an mbox for several), "
        "a directory (a file each), or - (stdout; the report goes to stderr)",
    )
    output.add_argument("--diff", action="store_true", help="a unified diff against the input")
    output.add_argument("--json", action="store_true", help="one JSON document instead")
    output.add_argument("--quiet", "-q", action="store_true", help="one line per message")
    check.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the longest wait for each reply, and for connecting (30)",
    )
    check.add_argument(
        "--log-level", default="WARNING", help="the in-memory milter's log level (WARNING)"
    )


def parse_macros(pairs: list[str]) -> dict[str, str | None]:
    macros: dict[str, str | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--macro {pair!r}: expected NAME=VALUE")
        macros[name.strip()] = value or None
    return macros


def check_command(args: argparse.Namespace, load: Callable[[str], Milter[Any, Any]]) -> int:
    """Run ``triomilter check``; the exit status. ``load`` loads MODULE[:ATTR]."""
    positional: list[str] = list(args.args)
    try:
        target: Milter[Any, Any] | str
        if args.connect:
            parse_socket_spec(args.connect)
            target = args.connect
        elif not positional:
            raise ValueError("give the milter: MODULE[:ATTR], or --connect SPEC")
        else:
            target = load(positional.pop(0))
        if args.client_address is not None:
            _parse_client_address(args.client_address)
        if args.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if args.output == "-" and args.json:
            raise ValueError("--output - and --json both want standard output")
        options = CheckOptions(
            target,
            tuple(positional),
            mta=Mta(args.mta),
            sender=args.sender,
            recipients=tuple(args.rcpt),
            client_name=args.client_name,
            client_address=args.client_address,
            helo=args.helo,
            macros=parse_macros(args.macro),
            step_timeout=args.timeout,
            keep_body=bool(args.output or args.diff),
        )
        report = trio.run(run_check, options)
    except (ValueError, MessageError) as exc:
        message = str(exc)
        if isinstance(exc, SocketSpecError) and args.connect and args.connect.count(":") == 2:
            message += " (libmilter's syntax is inet:PORT@HOST, not Postfix's inet:HOST:PORT)"
        print(f"triomilter: {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _report(report, args)
    except BrokenPipeError:
        # The reader went away (``| head``): not an error of the check.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return report.verdict.exit_status


def _report(report: CheckReport, args: argparse.Namespace) -> int:
    stdout: IO[str] = sys.stdout
    text = sys.stderr if args.output == "-" else stdout
    diffs = {
        number: diff_message(message, report.mta.title)
        for number, message in enumerate(report.messages)
        if args.diff
    }
    if args.json:
        json.dump(render_json(report, diffs if args.diff else None), stdout, indent=2)
        stdout.write("\n")
    elif args.quiet:
        render_quiet(report, text)
    else:
        render_text(report, text, headers=not args.diff)
    if args.diff and not args.json:
        text.flush()
        for diff in diffs.values():
            _binary(text).write(diff)
    if args.output:
        _write_output(report, args.output, text)
    return report.verdict.exit_status


def _binary(stream: IO[str]) -> IO[bytes]:
    stream.flush()
    buffer: IO[bytes] = getattr(stream, "buffer", None) or sys.stdout.buffer
    return buffer


def _write_output(report: CheckReport, path: str, text: IO[str]) -> None:
    delivered = [message for message in report.messages if message.delivery is not None]
    if path == "-":
        out = _binary(sys.stdout)
        _write_all(delivered, out)
        out.flush()
        return
    if os.path.isdir(path):
        for number, message in enumerate(delivered, 1):
            with open(os.path.join(path, output_name(message, number)), "wb") as out:
                write_delivered(message, out)
        return
    with open(path, "wb") as out:
        _write_all(delivered, out)


def _write_all(messages: list[MessageRecord], out: IO[bytes]) -> None:
    if len(messages) == 1:
        write_delivered(messages[0], out)
    elif messages:
        write_mbox(messages, out)
