"""The Gopher parsers and formatters: examples from real servers, and
hypothesis properties (never crash, round-trip, never escape the root)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockworks import UsageError
from sockworks.gopher.gophermap import parse_gophermap
from sockworks.gopher.items import (
    KINDS,
    DotStuffer,
    Item,
    format_menu,
    guess_type,
    looks_like_menu,
    parse_menu,
    sanitize,
    stuff_text,
    unstuff_text,
)
from sockworks.gopher.requests import BadRequest, parse_request, selector_parts, split_query
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


# -- raw bytes into every parser -----------------------------------------------
# Clients send bytes, not text: every parser is fed what hypothesis draws
# with binary(), and pieces that steer it into each branch.

INTERESTING = st.sampled_from([
    b"", b"/", b"URL:", b"/.search", b"/.search/", b"/.search?", b"caps.txt", b"%", b"%2e",
    b"%25", b"%ff", b"%c0%ae", b"\xff", b"\xc0\xae", b"\xed\xa0\x80", b"\t", b"\t+", b"?", b"..",
    b"//", b"\\", b"~", b"C:", b"\r", b"\x7f", b"\xe2\x80\xa8",
])
RAW = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(INTERESTING, st.binary(max_size=8)), max_size=12).map(b"".join),
)


@settings(max_examples=300)
@given(RAW)
def test_request_parsers_take_any_bytes(raw: bytes) -> None:
    """parse_request, split_query and selector_parts: a value or BadRequest."""
    try:
        request = parse_request(raw)
    except BadRequest:
        assert b"\x00" in raw
        return
    path, query = split_query(request.selector)
    assert query is None or path + "?" + query == request.selector
    try:
        parts = selector_parts(request.selector)
    except BadRequest as exc:
        assert exc.reason
        return
    # What passes names components that can be encoded back to the bytes sent.
    for part in parts:
        assert part.encode("utf-8", "surrogateescape") in raw


@pytest.mark.parametrize(
    "raw", [b"/\xff%41", b"\xff%2e%2e", b"/%ff%41", b"/a\xff/%2e%2e", b"%\xff", b"/\xed\xa0\x80%41"]
)
def test_selector_parts_with_bytes_that_are_not_utf8(raw: bytes) -> None:
    selector = parse_request(raw).selector
    try:
        selector_parts(selector)
    except BadRequest:
        pass  # refused is fine; an UnicodeEncodeError was the bug


@given(st.binary(max_size=64), st.one_of(st.none(), st.binary(max_size=600)))
def test_guess_type_takes_any_name_and_head(name: bytes, head: bytes | None) -> None:
    kind = guess_type(name.decode("utf-8", "surrogateescape"), head)
    assert kind in KINDS and len(kind) == 1


@given(st.binary(max_size=2000))
def test_menu_helpers_take_any_bytes(data: bytes) -> None:
    looks_like_menu(data)
    out = unstuff_text(data)
    assert out == b"" or out.endswith(b"\n")
    for item in parse_menu(data):
        # What was parsed can be written back as one menu line.
        line = Item(item.type, item.display, item.selector.replace("\t", " ")).to_bytes()
        assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1


@given(st.binary(max_size=2000))
def test_gophermap_lines_are_writable_menu_lines(data: bytes) -> None:
    gmap = parse_gophermap(data)
    for line in gmap.lines:
        assert len(line.type) == 1 and (line.type in "i*" or 0x21 <= ord(line.type) <= 0x7E)
        assert line.port is None or 1 <= line.port <= 65535


def test_gophermap_bad_types_and_ports() -> None:
    gmap = parse_gophermap(
        b"\xff not a type\t/x\n\x01ctl\t/y\n0ok\t/z\th\t99999999\n0big\t/b\th\t000001000000\n"
        b"0fine\t/f\th\t7071\n"
    )
    assert [(m.display, m.port) for m in gmap.lines] == [("ok", None), ("big", None),
                                                         ("fine", 7071)]


@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=100)))
def test_url_parsers_take_any_bytes(raw: bytes, selector: bytes | None) -> None:
    """What a person types or a menu holds: a Location or a UsageError."""
    for text in (raw.decode("latin-1"), raw.decode("utf-8", "surrogateescape"),
                 "gopher://" + raw.decode("latin-1")):
        for parse in (parse_url, lambda t: parse_target(
                t, None if selector is None else selector.decode("utf-8", "surrogateescape"))):
            try:
                loc = parse(text)
            except UsageError:
                continue
            assert 0 <= loc.port <= 65535
