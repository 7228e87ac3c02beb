"""Socket specs: libmilter's syntax, each bad spec's error, the forms that must work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from triomilter import SocketFamily
from triomilter._sockets import SocketSpec, SocketSpecError, parse_socket_spec
from triomilter.protocol import Continue

from ._mta import RawMta
from ._support import TIMEOUT, has_ipv6_loopback, served
from .sample_milters import milter

BAD_SPECS = [
    ("", "empty"),
    ("   ", "empty"),
    ("tcp:8894@127.0.0.1", "unknown protocol 'tcp'"),
    ("inet:", "no port"),
    ("inet:@127.0.0.1", "no port"),
    ("inet6:@::1", "no port"),
    ("inet:notaport@127.0.0.1", "neither a number nor a known service"),
    ("inet:-1@127.0.0.1", "neither a number nor a known service"),
    ("inet:70000@127.0.0.1", "out of range"),
    ("inet:8894@", "'@' but no host"),
    ("inet6:8894@", "'@' but no host"),
    ("unix:", "no path"),
    ("local:", "no path"),
    ("unix:/tmp/" + "x" * 200, "107 bytes"),
    ("unix:/tmp/a\0b", "NUL"),
]


@pytest.mark.parametrize(("spec", "reason"), BAD_SPECS)
def test_bad_spec_is_refused_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(SocketSpecError) as info:
        parse_socket_spec(spec)
    assert isinstance(info.value, ValueError)
    assert reason in str(info.value)


@pytest.mark.parametrize(("spec", "reason"), BAD_SPECS)
async def test_serve_refuses_a_bad_spec_before_binding(spec: str, reason: str) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(SocketSpecError, match=re.escape(reason)):
        async with served(milter, spec):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    "spec",
    [
        "inet:0@bad..host",  # not even a valid host name (no DNS query is made)
        "inet6:0@127.0.0.1",  # an IPv4 literal has no IPv6 address
        "inet:0@::1",  # and an IPv6 literal no IPv4 one
    ],
)
async def test_unresolvable_host_is_a_socket_spec_error(spec: str) -> None:
    parse_socket_spec(spec)  # the syntax is fine: only resolving fails
    with trio.fail_after(TIMEOUT), pytest.raises(SocketSpecError, match="cannot resolve"):
        async with served(milter, spec):
            pass  # pragma: no cover


async def test_address_in_use_is_a_socket_spec_error() -> None:
    async with served(milter, "inet:0@127.0.0.1") as first:
        port = first.address[1]
        with pytest.raises(SocketSpecError, match="cannot listen"):
            async with served(milter, f"inet:{port}@127.0.0.1"):
                pass  # pragma: no cover


# --- libmilter forms that must work --------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("inet:8894", SocketSpec(SocketFamily.INET, "", 8894)),
        ("inet:8894@127.0.0.1", SocketSpec(SocketFamily.INET, "127.0.0.1", 8894)),
        ("INET:8894@127.0.0.1", SocketSpec(SocketFamily.INET, "127.0.0.1", 8894)),
        ("Inet6:8894@::1", SocketSpec(SocketFamily.INET6, "::1", 8894)),
        ("inet6:8894@[::1]", SocketSpec(SocketFamily.INET6, "::1", 8894)),
        ("inet:8894@[127.0.0.1]", SocketSpec(SocketFamily.INET, "127.0.0.1", 8894)),
        ("inet:smtp@127.0.0.1", SocketSpec(SocketFamily.INET, "127.0.0.1", 25)),
        ("inet:0@localhost", SocketSpec(SocketFamily.INET, "localhost", 0)),
        ("unix:/run/milter.sock", SocketSpec(SocketFamily.UNIX, path="/run/milter.sock")),
        ("local:/run/milter.sock", SocketSpec(SocketFamily.UNIX, path="/run/milter.sock")),
        ("LOCAL:/run/milter.sock", SocketSpec(SocketFamily.UNIX, path="/run/milter.sock")),
        ("/run/milter.sock", SocketSpec(SocketFamily.UNIX, path="/run/milter.sock")),
    ],
)
def test_libmilter_forms_parse(spec: str, parsed: SocketSpec) -> None:
    assert parse_socket_spec(spec) == parsed


async def answers(address: object) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(address)
        assert (await client.transaction())[-1] == Continue()


@pytest.mark.parametrize("spec", ["INET:0@127.0.0.1", "inet:0@localhost"])
async def test_inet_forms_serve(spec: str) -> None:
    async with served(milter, spec) as srv:
        assert srv.address[1] != 0
        await answers(("127.0.0.1", srv.address[1]))


async def test_inet_without_host_binds_every_address() -> None:
    async with served(milter, "inet:0") as srv:
        assert srv.address[0] == "0.0.0.0"
        await answers(("127.0.0.1", srv.address[1]))


@pytest.mark.parametrize("form", ["local:{}", "unix:{}", "{}", "LOCAL:{}"])
async def test_unix_forms_serve(sock_dir: Path, form: str) -> None:
    path = sock_dir / "m.sock"
    async with served(milter, form.format(path)) as srv:
        assert path.exists()
        await answers(srv.address)
    assert not path.exists()


@pytest.mark.parametrize("spec", ["inet:0@[127.0.0.1]", "inet6:0@[::1]"])
async def test_bracketed_hosts_serve(spec: str) -> None:
    """libmilter accepts ``@[host]``; so do we (Sendmail's own S= does not: deploying.md)."""
    if "::1" in spec and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    async with served(milter, spec) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            assert await client.connect() == Continue()
