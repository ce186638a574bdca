"""The rough edges a newcomer hits on the command line (issue 13, items 4,
10, 11 and 14): options that do not apply, `-l :PORT`, URL-like endpoints,
`connect --zero udp:`, one error format, examples in every --help."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLIProcess, connect, run_cli


def one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


# -- item 4: options that do not apply are errors ----------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "echo", "--token", "x"],
         "--token does not apply to the echo service (token: an option of the greeting "
         "service only)"),
        (["serve", "echo", "--root", "/srv"],
         "--root does not apply to the echo service (root: an option of the gopher "
         "service only)"),
        (["serve", "greeting", "--quotes", "q.txt"],
         "--quotes does not apply to the greeting service (quotes: an option of the qotd "
         "service only)"),
        (["serve", "daytime", "--advertise", "h:70"],
         "--advertise does not apply to the daytime service (advertise: an option of the "
         "gopher service only)"),
        (["serve", "echo", "--workdir", "/tmp"],
         "--workdir does not apply to the echo service (workdir: an option of the exec "
         "service only)"),
        (["serve", "echo", "--app-dir", "/tmp"],
         "--app-dir does not apply to the echo service (app_dir: an option of MODULE:NAME "
         "services only)"),
    ],
)
def test_option_of_another_service_is_a_usage_error(args: list[str], expected: str) -> None:
    done = run_cli(*args, "-l", "tcp:127.0.0.1:0")
    assert done.returncode == 2
    assert one_line(done) == f"sockworks: error: {expected}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inetd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_key_of_another_service_names_file_key_and_service(tmp_path: Path) -> None:
    path = write(tmp_path, '[services.public-echo]\nservice = "echo"\n'
                 'listen = ["tcp:127.0.0.1:0"]\ntoken = "s3cret"\n')
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 2
    assert one_line(done) == (
        f"sockworks: error: {path}: services.public-echo.token: an option of the greeting "
        "service only, not of the echo service"
    )


def test_config_default_that_no_service_takes(tmp_path: Path) -> None:
    path = write(tmp_path, '[defaults]\nroot = "/srv"\n'
                 '[services.echo]\nlisten = ["tcp:127.0.0.1:0"]\n')
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 2
    assert one_line(done) == (
        f"sockworks: error: {path}: defaults.root: no service in this file takes it "
        "(an option of the gopher service)"
    )


def test_config_default_goes_to_the_services_that_take_it(
    cli: type[CLIProcess], tmp_path: Path
) -> None:
    # [defaults] token is for greeting; echo beside it is not an error.
    path = write(tmp_path, '[defaults]\ntoken = "s3cret"\n'
                 '[services.echo]\nlisten = ["tcp:127.0.0.1:0"]\n'
                 '[services.greeting]\nlisten = ["tcp:127.0.0.1:0"]\n')
    server = cli(["serve", "--config", str(path)])
    _, greeting = server.wait_listening(2)
    with connect(greeting) as sock:
        sock.sendall(b"s3cret\n")
        assert sock.recv(100).startswith(b"welcome")
    assert server.stop() == 0


# -- item 10: -l :PORT binds every interface, and says so ---------------------


def test_empty_host_listens_everywhere_and_says_so(cli: type[CLIProcess]) -> None:
    server = cli(["serve", "echo", "-l", ":0"])
    (endpoint,) = server.wait_listening()
    assert str(endpoint).startswith("tcp:[::]:"), server.log
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
        sock.sendall(b"v4")
        assert sock.recv(2) == b"v4"  # IPv4 too: every interface
    assert server.stop() == 0
    help_text = run_cli("serve", "--help").stdout.decode()
    assert re.search(r"-l :80 listens on\s+tcp:\[::\]:80,\s+open to the\s+network", help_text)


# -- item 11: URL-like endpoints, --zero and UDP ----------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "echo", "-l", "tcp://127.0.0.1:7007"],
         "endpoint 'tcp://127.0.0.1:7007' is written as a URL: write tcp:127.0.0.1:7007"),
        (["connect", "tcp://127.0.0.1:7007"],
         "endpoint 'tcp://127.0.0.1:7007' is written as a URL: write tcp:127.0.0.1:7007"),
        (["listen", "udp://127.0.0.1:0/"],
         "endpoint 'udp://127.0.0.1:0/' is written as a URL: write udp:127.0.0.1:0"),
        (["connect", "unix:///tmp/x.sock"],
         "endpoint 'unix:///tmp/x.sock' is written as a URL: write unix:/tmp/x.sock"),
        (["serve", "tcp://127.0.0.1:7007"],
         "'tcp://127.0.0.1:7007' is an endpoint, not a service: name the service and give "
         "the endpoint with -l (sockworks serve echo -l tcp:127.0.0.1:7007)"),
        (["connect", "--zero", "udp:127.0.0.1:7-9"],
         "--zero scans TCP ports only, not udp (a UDP port that answers nothing may be open "
         "or filtered): write HOST:PORTS, e.g. 127.0.0.1:20-25,80"),
        (["connect", "--zero", "tcp://127.0.0.1:7-9"],
         "endpoint 'tcp://127.0.0.1:7-9' is written as a URL: write tcp:127.0.0.1:7-9"),
    ],
)
def test_url_like_endpoints_and_zero_udp(args: list[str], expected: str) -> None:
    done = run_cli(*args, input=b"")
    assert done.returncode == 2, done.stderr
    assert one_line(done) == f"sockworks: error: {expected}"


# -- item 14: one error format, examples, what --timeout means ---------------


@pytest.mark.parametrize(
    ("args", "prog"),
    [
        (["serve", "echo", "--timeout", "soon"], "sockworks serve"),
        (["serve", "echo", "--bogus"], "sockworks serve"),
        (["connect", "--bogus", "127.0.0.1:1"], "sockworks connect"),
        (["listen"], "sockworks listen"),
        (["gopher"], "sockworks gopher"),
        (["--bogus"], "sockworks"),
    ],
)
def test_usage_errors_start_like_every_other_error(args: list[str], prog: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    line = one_line(done)
    assert line.startswith("sockworks: error: "), line
    assert line.endswith(f"(see {prog} --help)"), line


def test_listen_bind_error_names_the_endpoint_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("listen", f"tcp:127.0.0.1:{port}", input=b"")
    assert done.returncode == 1
    assert one_line(done) == (
        f"sockworks: error: cannot bind tcp:127.0.0.1:{port}: address already in use"
    )


@pytest.mark.parametrize("command", ["serve", "demo", "services", "connect", "listen", "gopher"])
def test_every_help_has_examples(command: str) -> None:
    text = run_cli(command, "--help").stdout.decode()
    examples = text.partition("\nexamples:\n")[2]
    lines = [line for line in examples.splitlines() if "sockworks " in line]
    assert len(lines) >= 2, text


def test_help_points_to_docs_that_exist() -> None:
    text = run_cli("serve", "--help").stdout.decode()
    text = re.sub(r"\s+", " ", text)
    paths = re.findall(r"see (/\S+\.md)", text)
    assert paths, "serve --help names no document"
    for path in paths:
        assert Path(path).is_file(), path
    assert "see docs/classic.md)" not in text


def test_timeout_says_what_it_means_in_each_command() -> None:
    serve = re.sub(r"\s+", " ", run_cli("serve", "--help").stdout.decode())
    connect_help = re.sub(r"\s+", " ", run_cli("connect", "--help").stdout.decode())
    assert "--timeout SECONDS, --idle-timeout SECONDS idle timeout:" in serve
    assert "(not a connect timeout)" in serve
    assert "connect timeout: give up connecting" in connect_help
    assert "in serve, --timeout is the idle timeout" in connect_help


def test_idle_timeout_alias(cli: type[CLIProcess]) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--idle-timeout", "0.2"])
    (endpoint,) = server.wait_listening()
    with connect(endpoint) as sock:
        assert sock.recv(10) == b""  # cut off when idle, as --timeout 0.2 would
    server.wait_for(r"closed after .*idle timeout")
    assert server.stop() == 0


def test_python_m_and_help_run_without_a_source_tree() -> None:
    # --help must not fail when the docs are not where a checkout has them.
    done = subprocess.run([sys.executable, "-m", "sockworks", "serve", "--help"],
                          capture_output=True, timeout=20, cwd="/")
    assert done.returncode == 0 and b"examples:" in done.stdout
