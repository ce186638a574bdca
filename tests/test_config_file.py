"""``sockworks serve --config FILE.toml``: every error named with the file,
the key and the reason, before anything binds; and a config that runs."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, connect, datagram_exchange, recv_all, run_cli

from sockworks import ConfigError
from sockworks._configfile import load_config
from sockworks.services import SERVICES

GOOD_SERVICE = '[services.echo]\nlisten = ["tcp:127.0.0.1:0"]\n'


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Malformed TOML.
        ("[services.echo\n", r"not valid TOML: .*line 1"),
        ("[services.echo]\nlisten = [\n", r"not valid TOML"),
        ('a = "unterminated\n', r"not valid TOML"),
        # Unknown keys, at every level.
        ('[servers]\nx = 1\n', r"servers: unknown key \(known: server, defaults, services\)"),
        (GOOD_SERVICE + "[server]\nworker = 4\n",
         r"server\.worker: unknown key \(known: grace, workers"),
        (GOOD_SERVICE + "[server]\nworkers = 0\n", r"server\.workers: 0 is not a number of"),
        (GOOD_SERVICE + '[server]\nworkers = "many"\n', r"server\.workers: 'many' is not a"),
        (GOOD_SERVICE + '[server]\nlog_format = "xml"\n',
         r"server\.log_format: expected one of text, json"),
        (GOOD_SERVICE + '[server]\nmetrics = "udp:127.0.0.1:9"\n',
         r"server\.metrics: metrics are served over HTTP"),
        (GOOD_SERVICE + "[defaults]\nlisen = []\n", r"defaults\.lisen: unknown key"),
        (GOOD_SERVICE + "timout = 5\n", r"services\.echo\.timout: unknown key"),
        # Unknown services.
        ('[services.ech]\nlisten = ["tcp:127.0.0.1:0"]\n',
         r"services\.ech: unknown service 'ech' \(known: .*echo"),
        ('[services.x]\nservice = "nope"\n', r"services\.x\.service: unknown service 'nope'"),
        # Wrong types and ranges.
        (GOOD_SERVICE + 'timeout = "x"\n', r"services\.echo\.timeout: expected seconds"),
        (GOOD_SERVICE + "timeout = -1\n", r"services\.echo\.timeout: expected seconds"),
        (GOOD_SERVICE + "max_line = 0\n", r"services\.echo\.max_line: expected a positive"),
        (GOOD_SERVICE + "max_line = 1.5\n", r"services\.echo\.max_line: expected a positive"),
        (GOOD_SERVICE + "max_conns = true\n", r"services\.echo\.max_conns: expected"),
        (GOOD_SERVICE + 'nodelay = "yes"\n', r"services\.echo\.nodelay: expected true or false"),
        (GOOD_SERVICE + "max_datagram = 70000\n", r"max_datagram: expected .* up to 65535"),
        (GOOD_SERVICE + "per_source = -1\n",
         r"services\.echo\.per_source: expected a positive .*\(0 or \"off\" for none\)"),
        (GOOD_SERVICE + 'cps = "fast"\n', r"services\.echo\.cps: expected .*\(or \"off\"\)"),
        (GOOD_SERVICE + "max_amplification = -2\n", r"services\.echo\.max_amplification"),
        (GOOD_SERVICE + "udp_burst = 0\n", r"services\.echo\.udp_burst"),
        (GOOD_SERVICE + "drop_source_ports = [99999]\n", r"drop_source_ports: expected a port"),
        (GOOD_SERVICE + 'allow = ["10.0.0.0/33"]\n',
         r"services\.echo\.allow: '10\.0\.0\.0/33' is not an IPv4/IPv6 address or CIDR network"),
        (GOOD_SERVICE + "deny = 12\n", r"services\.echo\.deny: .*not an address"),
        (GOOD_SERVICE + "allow = {a = 1}\n", r"services\.echo\.allow: expected a list"),
        ("[services.echo]\nlisten = 7007\n", r"services\.echo\.listen: expected an endpoint"),
        ('[services.echo]\nlisten = ["tcp:127.0.0.1"]\n', r"services\.echo\.listen: .*no port"),
        ("[services.echo]\nlisten = []\n", r"services\.echo\.listen: .*at least one endpoint"),
        (GOOD_SERVICE + "[server]\ngrace = \"long\"\n", r"server\.grace: expected seconds"),
        ("services = 3\n", r"services: expected a table"),
        ("[services]\necho = 3\n", r"services\.echo: expected a table"),
        ("[server]\ngrace = 1\n", r"services: no service configured"),
        (GOOD_SERVICE + '[defaults]\nlisten = ["tcp:127.0.0.1:0"]\n',
         r"defaults\.listen: belongs in a \[services\.NAME\] table"),
        # Two services on one listener, or one listener given twice.
        ('[services.echo]\nlisten = ["tcp:127.0.0.1:7007"]\n'
         '[services.discard]\nlisten = ["tcp:127.0.0.1:7007"]\n',
         r"services\.discard\.listen: tcp:127\.0\.0\.1:7007 is also a listener of services\.echo"),
        ('[services.echo]\nlisten = ["udp:127.0.0.1:7007", "udp:127.0.0.1:7007"]\n',
         r"services\.echo\.listen: udp:127\.0\.0\.1:7007 is given twice"),
        # A listener the service cannot serve.
        ('[services.greeting]\nlisten = ["udp:127.0.0.1:0"]\n',
         r"services\.greeting\.listen: greeting cannot serve udp endpoints"),
        # A quotes file that is missing or breaks RFC 865.
        ('[services.qotd]\nquotes = "missing.txt"\n',
         r"services\.qotd\.quotes: cannot read '.*missing\.txt': No such file"),
    ],
)
def test_config_errors_name_file_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert re.search(message, str(info.value)), str(info.value)


def test_quotes_file_errors(tmp_path: Path) -> None:
    (tmp_path / "long.txt").write_text("ok\n\n" + "x" * 600 + "\n")
    path = write(tmp_path, '[services.qotd]\nquotes = "long.txt"\n')
    with pytest.raises(ConfigError, match=r"services\.qotd\.quotes: .*quote 2 is 602 characters"):
        load_config(path)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe[services]\n")
    with pytest.raises(ConfigError, match=r"bin\.toml: not valid TOML"):
        load_config(bad)


def test_port_zero_may_repeat_and_defaults_apply(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[defaults]\ntimeout = 7\ndeny = ["10.0.0.0/8"]\n'
        '[services.echo]\nlisten = ["tcp:127.0.0.1:0"]\n'
        '[services.other]\nservice = "echo"\nlisten = ["tcp:127.0.0.1:0"]\ntimeout = 0\n',
    )
    loaded = load_config(path)
    echo, other = loaded.services
    assert (echo.name, other.name) == ("echo", "other")
    assert echo.limits.idle_timeout == 7 and other.limits.idle_timeout is None
    assert echo.access is not None and echo.access.deny == ("10.0.0.0/8",)
    assert loaded.grace is None


def test_off_values(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_SERVICE + 'max_amplification = "off"\nudp_rate = false\n')
    (echo,) = load_config(path).services
    assert echo.access is not None
    assert echo.access.max_amplification is None and echo.access.udp_rate is None


def test_per_source_is_on_by_default_and_0_or_off_turns_it_off(tmp_path: Path) -> None:
    def per_source(extra: str) -> int | None:
        (echo,) = load_config(write(tmp_path, GOOD_SERVICE + extra)).services
        assert echo.access is not None
        return echo.access.per_source

    assert per_source("") == 64  # a quarter of max_conns (1024), at most 64
    assert per_source("max_conns = 8\n") == 2
    assert per_source("per_source = 5\n") == 5
    for off in ("0", '"off"', "false"):
        assert per_source(f"per_source = {off}\n") is None, off
    loaded = load_config(write(tmp_path, '[defaults]\nper_source = 0\n' + GOOD_SERVICE))
    assert loaded.services[0].access is not None
    assert loaded.services[0].access.per_source is None


def test_example_config_runs_every_classic_and_seed_service() -> None:
    loaded = load_config(ROOT / "examples" / "inetd.toml")
    names = {s.name for s in loaded.services}
    for name in ("echo", "discard", "daytime", "qotd", "chargen", "time",
                 "timestamp", "greeting", "thanks", "charcount"):
        assert name in names and name in SERVICES
    assert loaded.grace == 5


# -- the CLI -------------------------------------------------------------------


def test_cli_reports_one_line_and_binds_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_SERVICE + '[services.bad]\nservice = "time"\ntimeout = "x"\n')
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 2
    err = done.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith(f"sockworks: error: {path}: services.bad.timeout: expected seconds")
    assert "listening" not in err and "Traceback" not in err


def test_cli_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[services\n")
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.decode().startswith(f"sockworks: error: {path}: not valid TOML")


def test_cli_config_excludes_service_and_options(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_SERVICE)
    for extra in (["echo"], ["--timeout", "3"], ["-l", "tcp:127.0.0.1:0"], ["--deny", "::1"]):
        done = run_cli("serve", "--config", str(path), *extra)
        assert done.returncode == 2, extra
        assert b"--config runs the services its file describes" in done.stderr


def test_cli_needs_a_service_or_a_config() -> None:
    done = run_cli("serve")
    assert done.returncode == 2
    assert b"name a SERVICE to run, or give --config" in done.stderr


def test_cli_bad_access_options() -> None:
    for args in (["--allow", "nonsense"], ["--cps", "0"], ["--max-amplification", "-1"],
                 ["--udp-rate", "x"], ["--drop-source-port", "70000"]):
        done = run_cli("serve", "echo", *args)
        assert done.returncode == 2, args
        assert done.stderr.decode().count("\n") == 1


def test_cli_runs_several_services_in_one_process(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write(
        tmp_path,
        '[server]\ngrace = 1\n'
        '[services.echo]\nlisten = ["tcp:127.0.0.1:0", "udp:127.0.0.1:0"]\n'
        '[services.time]\nlisten = ["tcp:127.0.0.1:0"]\n'
        '[services.greeting]\nlisten = ["tcp:127.0.0.1:0"]\ntoken = "s3cret"\n'
        '[services.timestamp]\nlisten = ["udp:127.0.0.1:0"]\n'
        f'[services.unixecho]\nservice = "echo"\nlisten = ["unix:{tmp_path}/e.sock"]\n',
    )
    server = cli(["serve", "--config", str(path)])
    echo_tcp, echo_udp, time_tcp, greet, stamp, unix = server.wait_listening(6)
    with connect(echo_tcp) as s:
        s.sendall(b"one")
        assert s.recv(3) == b"one"
    assert datagram_exchange(echo_udp, b"two")[0] == b"two"
    with connect(time_tcp) as s:
        assert len(recv_all(s)) == 4
    with connect(greet) as s:
        s.sendall(b"s3cret")
        assert recv_all(s) == b"welcome to server!"
    assert datagram_exchange(stamp, b"x")[0].endswith(b"] x")
    with connect(unix) as s:
        s.sendall(b"three")
        assert s.recv(5) == b"three"
    assert server.stop() == 0


# -- files that used to end in a traceback --------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000 + "]" * 100_000 + "\n",  # arrays 100,000 deep
        "a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n",  # inline tables 5,000 deep
        GOOD_SERVICE + "timeout = " + "[" * 300 + "]" * 300 + "\n",  # parses; a bad value
    ],
    ids=["arrays", "inline-tables", "shallower"],
)
def test_deeply_nested_file_is_one_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    done = run_cli("serve", "--config", str(path))
    err = done.stderr.decode()
    assert done.returncode == 2, err[-500:]
    assert err.count("\n") == 1 and len(err) < 500, err[-500:]
    assert err.startswith(f"sockworks: error: {path}: ")
    assert "nested too deeply" in err or "expected seconds" in err
    assert "Traceback" not in err and "listening" not in err


def run_with_fd_limit(limit: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``sockworks ARGS`` with RLIMIT_NOFILE lowered to ``limit``."""

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "sockworks", *args],
        capture_output=True, timeout=15, cwd=ROOT, preexec_fn=lower,
    )


@pytest.mark.parametrize("listeners", [100, 40])  # over the limit; over what it can serve
def test_more_listeners_than_the_descriptor_limit(tmp_path: Path, listeners: int) -> None:
    endpoints = ", ".join(['"tcp:127.0.0.1:0"'] * listeners)
    path = write(tmp_path, f"[services.echo]\nlisten = [{endpoints}]\n")
    try:
        done = run_with_fd_limit(64, "serve", "--config", str(path))
    except subprocess.TimeoutExpired:
        pytest.fail("sockworks started serving some of the listeners")
    err = done.stderr.decode()
    assert done.returncode == 1, err[-1000:]
    assert err.count("\n") == 1, err[-1000:]
    assert err.startswith(f"sockworks: error: {path}: {listeners} listeners need about ")
    assert "limit of 64" in err and "ulimit -n" in err and "LimitNOFILE=" in err
    assert "Traceback" not in err and "listening" not in err


def test_out_of_descriptors_while_binding_is_a_bind_error_and_binds_nothing() -> None:
    # Past the CLI's check (descriptors taken by something else meanwhile):
    # the bind loop says the same in one line and closes what it bound.
    code = """if True:
        import os, resource
        from sockworks import BindError, parse_endpoint
        from sockworks._configfile import build_service
        from sockworks._server import Server
        before = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (before + 20, before + 20))
        listen = [parse_endpoint("tcp:127.0.0.1:0")] * 40
        try:
            Server([build_service("echo", {"listen": listen})]).bind()
        except BindError as exc:
            print(exc)
        print(len(os.listdir("/proc/self/fd")) - before)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=15)
    message, left_open = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stderr.decode()
    assert re.fullmatch(
        r"cannot bind tcp:127\.0\.0\.1:0: too many open files \(the limit is \d+ per process; "
        r"raise it with `ulimit -n \d+` or LimitNOFILE=\d+ in the systemd unit\)",
        message,
    ), message
    assert left_open == "0"
