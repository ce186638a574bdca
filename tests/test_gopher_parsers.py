"""The Gopher parsers and formatters: examples from real servers, and
hypothesis properties (never crash, round-trip, never escape the root)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockworks import UsageError
from sockworks.gopher.gophermap import parse_gophermap
from sockworks.gopher.items import (
    DotStuffer,
    Item,
    format_menu,
    looks_like_menu,
    parse_menu,
    sanitize,
    stuff_text,
    unstuff_text,
)
from sockworks.gopher.requests import BadRequest, parse_request, selector_parts
from sockworks.gopher.url import Location, parse_target, parse_url

MENU = (
    b"iWelcome\t\tnull.host\t1\r\n"
    b"0About\t/about.txt\texample.org\t70\r\n"
    b"1Docs\t/docs\texample.org\t7070\r\n"
)


@pytest.mark.parametrize("ending", [b".\r\n", b".\n", b"", b".\r\nJUNK after the end\r\n"])
def test_menu_with_and_without_final_dot(ending: bytes) -> None:
    items = parse_menu(MENU + ending)
    assert [(i.type, i.display, i.selector, i.host, i.port) for i in items] == [
        ("i", "Welcome", "", "null.host", 1),
        ("0", "About", "/about.txt", "example.org", 70),
        ("1", "Docs", "/docs", "example.org", 7070),
    ]


def test_menu_lf_only_extra_fields_and_gopher_plus() -> None:
    data = b"0A\t/a\th\t70\t+\n1B\t/b\th\t70\t+\textra\tmore\n9C\t/c\th\tbad-port\n"
    a, b, c = parse_menu(data)
    assert a.gopher_plus and a.extra == ("+",)
    assert b.extra == ("+", "extra", "more") and b.selector == "/b"
    assert c.port == 0 and not c.gopher_plus


def test_menu_latin1_and_odd_lines() -> None:
    data = b"0Caf\xe9 menu\t/caf\xe9\th\t70\r\nno tabs at all\r\n\r\n3Error\t\terror.host\t1\r\n"
    items = parse_menu(data)
    assert items[0].display == "Café menu"
    assert items[0].selector.encode("utf-8", "surrogateescape") == b"/caf\xe9"
    assert items[1].type == "i" and items[1].display == "no tabs at all"
    assert items[2].type == "3"
    assert looks_like_menu(MENU) and not looks_like_menu(b"just some text\n")


def test_format_round_trip_and_sanitising() -> None:
    items = [Item("0", "a\tb\r\nc", "/x", "h", 70), Item("1", "d", "/y", "h", 71, ("+",))]
    out = format_menu(items)
    assert out.endswith(b"\r\n.\r\n")
    back = parse_menu(out)
    assert back[0].display == "a  c"[:1] + " b  c" and back[1].extra == ("+",)


@given(st.binary(max_size=2000))
def test_parse_menu_never_crashes(data: bytes) -> None:
    for item in parse_menu(data):
        assert isinstance(item.type, str) and 0 <= item.port <= 99999


@given(
    st.lists(
        st.tuples(
            st.sampled_from("0179ghIis"),
            st.text(max_size=30),
            st.text(alphabet=st.characters(blacklist_characters="\t\r\n\x00",
                                           blacklist_categories=("Cs",)), max_size=30),
            st.integers(1, 65535),
        ),
        max_size=20,
    )
)
def test_format_then_parse(rows: list[tuple[str, str, str, int]]) -> None:
    items = [Item(t, d, s, "host.example", p) for t, d, s, p in rows]
    back = parse_menu(format_menu(items))
    kept = [i for i in items]
    assert len(back) == len(kept)
    for a, b in zip(kept, back, strict=True):
        assert (b.type, b.selector, b.port) == (a.type, a.selector, a.port)
        assert b.display == sanitize(a.display)


@given(st.binary(max_size=3000), st.integers(1, 50))
def test_stuff_unstuff_round_trip_any_chunking(body: bytes, size: int) -> None:
    body = body.replace(b"\r", b"")
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(body[i : i + size]) for i in range(0, len(body), size))
    out += stuffer.finish()
    assert out == stuff_text(body)
    assert out.endswith(b".\r\n")
    # No line of the body is the terminator; the only "." line is the last.
    assert out.split(b"\r\n")[:-2].count(b".") == 0
    expected = body if not body or body.endswith(b"\n") else body + b"\n"
    assert unstuff_text(out) == expected


@given(st.binary(max_size=300))
def test_selector_validation_never_lets_a_dot_component_through(raw: bytes) -> None:
    try:
        request = parse_request(raw)
        parts = selector_parts(request.selector)
    except BadRequest:
        return
    for part in parts:
        assert part and not part.startswith(".") and "\\" not in part and "\x00" not in part
        assert all(ord(c) >= 0x20 for c in part)


@given(st.binary(max_size=2000))
def test_gophermap_never_crashes(data: bytes) -> None:
    for line in parse_gophermap(data).lines:
        assert line.type


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("gopher://example.org", Location("example.org", 70, "", "1")),
        ("gopher://example.org/", Location("example.org", 70, "", "1")),
        ("gopher://example.org:7070/1/docs", Location("example.org", 7070, "/docs", "1")),
        ("gopher://example.org/0/a%20b.txt", Location("example.org", 70, "/a b.txt", "0")),
        ("gopher://example.org/7/.search%09two%20words",
         Location("example.org", 70, "/.search", "7", "two words")),
        ("gopher://example.org/7/s%09q%09%2B", Location("example.org", 70, "/s", "7", "q")),
        ("gopher://[::1]:70/1/x", Location("::1", 70, "/x", "1")),
        ("GOPHER://Example.org/9", Location("Example.org", 70, "", "9")),
    ],
)
def test_urls(url: str, expected: Location) -> None:
    assert parse_url(url) == expected


def test_seed_forms() -> None:
    assert parse_target("quux.org") == Location("quux.org", 70, "", "1")
    assert parse_target("quux.org/") == Location("quux.org", 70, "", "1")
    assert parse_target("quux.org", "/about") == Location("quux.org", 70, "/about", None)
    assert parse_target("127.0.0.1:7070", "") == Location("127.0.0.1", 7070, "", "1")
    for bad in ("http://x/", "gopher://", "gopher://h:99999/", "h:port"):
        with pytest.raises(UsageError):
            parse_target(bad)


NO_TAB = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_characters="\t\r\n", blacklist_categories=("Cs",)),
        st.sampled_from("\udce9\udcff"),  # a Latin-1 byte kept as a surrogate escape
    ),
    max_size=40,
)


@settings(max_examples=200)
@given(NO_TAB, st.sampled_from("0179"), st.one_of(st.none(), NO_TAB))
def test_url_round_trip(selector: str, type_: str, query: str | None) -> None:
    loc = Location("example.org", 7070, "/" + selector.lstrip("/"), type_, query)
    assert parse_url(loc.url()) == loc
