"""Property-based tests of the parsers and the allow/deny rule."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sockworks import ConfigError
from sockworks._access import AccessPolicy
from sockworks._configfile import load_config
from sockworks.protocols.classic import parse_quotes

octet = st.integers(0, 255)
v4 = st.builds(lambda a, b: f"127.0.{a}.{b}", octet, octet)
v4_net = st.builds(
    lambda a, b, p: str(ipaddress.ip_network(f"127.0.{a}.{b}/{p}", strict=False)),
    octet, octet, st.integers(8, 32),
)


def reference(allow: list[str], deny: list[str], host: str) -> bool:
    """The documented rule, written the slow and obvious way."""
    addr = ipaddress.ip_address(host)
    matches = [(ipaddress.ip_network(n).prefixlen, kind)
               for kind, nets in (("allow", allow), ("deny", deny))
               for n in nets if addr in ipaddress.ip_network(n)]
    if not matches:
        return not allow
    longest = max(p for p, _ in matches)
    return all(kind == "allow" for p, kind in matches if p == longest)


@given(st.lists(v4_net, max_size=5), st.lists(v4_net, max_size=5), v4)
def test_most_specific_rule_matches_the_reference(
    allow: list[str], deny: list[str], host: str
) -> None:
    policy = AccessPolicy(allow=tuple(allow), deny=tuple(deny))
    assert (policy.decide(host) is None) is reference(allow, deny, host)


@given(st.lists(v4_net, max_size=4), st.lists(v4_net, max_size=4), v4)
def test_order_of_rules_never_matters(allow: list[str], deny: list[str], host: str) -> None:
    a = AccessPolicy(allow=tuple(allow), deny=tuple(deny)).decide(host) is None
    b = AccessPolicy(allow=tuple(reversed(allow)), deny=tuple(reversed(deny))).decide(host)
    assert a is (b is None)


@given(st.text(max_size=2000))
def test_parse_quotes_accepts_or_names_the_problem(text: str) -> None:
    try:
        quotes = parse_quotes(text)
    except ConfigError as exc:
        assert str(exc).startswith("quotes: ")
        return
    for q in quotes:
        assert 0 < len(q) < 512 and q.endswith(b"\r\n")
        assert all(32 <= c < 127 or c in (10, 13) for c in q)


toml_value = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["listen", "timeout", "allow", "deny", "per_source", "cps", "service",
                        "max_amplification", "udp_rate", "quotes", "nodelay", "bogus"])


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else "0"
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    return '"none"'


@settings(max_examples=150, deadline=None)
@given(
    table=st.dictionaries(keys, toml_value, max_size=4),
    name=st.sampled_from(["echo", "qotd", "x"]),
)
def test_any_service_table_loads_or_raises_config_error(
    table: dict[str, object], name: str, tmp_path_factory: object
) -> None:
    lines = [f"[services.{name}]"]
    lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    text = "\n".join(lines) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # our own rendering; the malformed-TOML path is tested elsewhere
    path = Path(tmp_path_factory.mktemp("fuzz")) / "c.toml"  # type: ignore[attr-defined]
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
