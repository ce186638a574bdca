"""The examples and the README say what sockworks does (issue 13, item 15)."""

from __future__ import annotations

import tomllib

import pytest
from conftest import ROOT, connect, recv_all

from sockworks._configfile import load_config
from sockworks.protocols.seeds import Greeting
from sockworks.services import SERVICES
from sockworks.testing import ProtocolTester, running

INETD = ROOT / "examples" / "inetd.toml"


def test_inetd_example_has_every_builtin_service() -> None:
    tables = tomllib.loads(INETD.read_text())["services"]
    kinds = {table.get("service", name) for name, table in tables.items()}
    assert set(SERVICES) <= kinds, f"missing from {INETD.name}: {set(SERVICES) - kinds}"


def test_inetd_example_loads_and_serves_the_documentation_hole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The example's gopher root is relative to the current directory (the
    # loader resolves only `quotes` against the file): run it as README says.
    monkeypatch.chdir(ROOT)
    loaded = load_config(INETD)  # every key checked, nothing bound
    gopher = next(c for c in loaded.services if c.name == "gopher")
    assert [str(e) for e in gopher.listen] == ["tcp:127.0.0.1:7070"]
    # Its handler on port 0, not the example's fixed port.
    with running(gopher.handler, "tcp:127.0.0.1:0") as server, connect(server.endpoint()) as sock:
        sock.sendall(b"\r\n")
        menu = recv_all(sock).decode()
    assert "sockworks: the documentation, as a Gopher hole" in menu
    assert "gopher.md\t" in menu  # a link into the hole


def test_readme_greeting_row_says_what_a_timeout_does() -> None:
    row = next(
        line for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `greeting`")
    )
    answers = ProtocolTester(Greeting(b"1"))
    answers.connect()
    assert answers.feed(b"2") == b"please go out!"
    silent = ProtocolTester(Greeting(b"1"))
    silent.connect()
    assert silent.timeout() == b"" and silent.closed  # the seed's server sends nothing
    # The row names both answers, and does not give the timeout one of them.
    assert "`welcome to server!`" in row and "`please go out!`" in row
    assert "without a word" in row, row
    assert "else `please go out!`" not in row, row
