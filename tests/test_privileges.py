"""--user and --group (issue 10): bind as root, then serve as nobody.

Run as root (CI is): the server really drops, and the tests read what the
kernel says in /proc/PID/status. The gopher and echo examples bind ports 70
and 7 because the issue asks for privileged ports; every other test binds
port 0 or a Unix socket. Examples come from the privilege section of the
deployment docs, run as written but for the host (127.0.0.1, never every
interface) and the paths (the test's own).

Files given to the server live in directories made here under /tmp with
modes chosen per test: pytest's tmp_path is inside a 0700 directory that
nobody cannot enter at all.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, CLIProcess, connect, datagram_exchange, recv_all, require_peer, run_cli

from sockworks._errors import ConfigError
from sockworks._privileges import (
    Credentials,
    PrivilegeError,
    _verify,
    check_as,
    drop,
    required_paths,
    resolve,
)

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the server binds ports 70 and 7 and drops to nobody (CI runs as root)",
)
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)  # nobody's primary group (nogroup on Debian)

# The deployment docs, whose privilege section the tests run.
DOC = (ROOT / "docs" / "deploy.md").read_text("utf-8")


def example(kind: str, contains: str) -> str:
    """The one ```KIND block of the privilege docs holding ``contains``."""
    blocks = [b for b in re.findall(rf"```{kind}\n(.*?)```", DOC, re.S) if contains in b]
    assert len(blocks) == 1, f"the docs have {len(blocks)} {kind} examples with {contains!r}"
    return str(blocks[0]).strip()


def command(text: str) -> list[str]:
    """A documented ``sudo sockworks serve ...`` line as cli() arguments:
    these tests already run as root, and python -m sockworks is sockworks."""
    words = text.split()
    assert words[:2] == ["sudo", "sockworks"], text
    return [w.replace("tcp:0.0.0.0:", "tcp:127.0.0.1:") for w in words[2:]]


@pytest.fixture
def place() -> Iterator[Callable[[int], Path]]:
    """Directories under /tmp with a given mode (nobody must be able to
    reach them, or not), removed afterwards."""
    made: list[Path] = []

    def make(mode: int) -> Path:
        path = Path(tempfile.mkdtemp(prefix="sockworks-priv-", dir="/tmp"))
        path.chmod(mode)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def require_port(port: int, *kinds: socket.SocketKind) -> None:
    """Fail, saying why, when a fixed privileged port is taken here."""
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                name = "tcp" if kind == socket.SOCK_STREAM else "udp"
                pytest.fail(
                    f"{name} port {port} on 127.0.0.1 is taken on this machine "
                    f"({exc.strerror}): this test needs it (the issue asks for a "
                    "privileged port); free it and run again"
                )


def ids(pid: int) -> dict[str, list[str]]:
    """The ids and capabilities the kernel holds for ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapAmb"):
            out[key] = value.split()
    return out


def assert_dropped(pid: int, gid: int = NOGROUP.gr_gid) -> None:
    held = ids(pid)
    assert held["Uid"] == [str(NOBODY.pw_uid)] * 4, held  # real, effective, saved, fs
    assert held["Gid"] == [str(gid)] * 4, held
    assert held["Groups"] == [], held
    for capabilities in ("CapEff", "CapPrm", "CapAmb"):
        assert int(held[capabilities][0], 16) == 0, held


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockworks: error: "), lines
    assert result.stdout == b""
    return lines[0].removeprefix("sockworks: error: ")


def gopher_root(place: Callable[[int], Path]) -> Path:
    root = place(0o755)
    write(root / "hello.txt", "served by nobody\n")
    return root


# -- the issue's examples: privileged ports, then nobody ------------------


@ROOT_ONLY
def test_gopher_on_port_70_serves_as_nobody(cli: type[CLIProcess], place: Callable[[int], Path],
                                            tmp_path: Path) -> None:
    require_port(70, socket.SOCK_STREAM)
    root = gopher_root(place)
    args = command(example("sh", "sudo sockworks serve gopher"))
    args = [a.replace("/srv/gopher", str(root)) for a in args]
    server = cli(args)
    [endpoint] = server.wait_listening(1)
    assert (endpoint.host, endpoint.port) == ("127.0.0.1", 70)
    server.wait_for(rf"running as user nobody \(uid {NOBODY.pw_uid}\), group nogroup")
    assert_dropped(server.proc.pid)
    # The docs' own way of looking, from a script (not sh -c: its command
    # line would match pgrep's pattern itself).
    look = write(tmp_path / "look.sh", example("sh", "/proc/") + "\n")
    shown = subprocess.run(["sh", str(look)], capture_output=True, text=True, timeout=10)
    assert f"Uid:\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}" in (
        shown.stdout), shown
    assert re.search(r"^Groups:\s*$", shown.stdout, re.M), shown.stdout
    # A real Gopher client gets the menu of the root, then a file in it.
    curl = require_peer("curl")
    menu = subprocess.run([curl, "-sS", "gopher://127.0.0.1:70/"], capture_output=True,
                          timeout=10, check=True).stdout
    assert b"0hello.txt\t/hello.txt\t127.0.0.1\t70" in menu
    text = subprocess.run([curl, "-sS", "gopher://127.0.0.1:70/0/hello.txt"],
                          capture_output=True, timeout=10, check=True).stdout
    assert text.startswith(b"served by nobody\r\n")  # type 0: CRLF lines
    assert server.stop() == 0
    assert "Traceback" not in server.log


@ROOT_ONLY
def test_echo_on_port_7_tcp_and_udp_serves_as_nobody(cli: type[CLIProcess]) -> None:
    require_port(7, socket.SOCK_STREAM, socket.SOCK_DGRAM)
    server = cli(command(example("sh", "sudo sockworks serve echo")))
    tcp, udp = server.wait_listening(2)
    assert (str(tcp), str(udp)) == ("tcp:127.0.0.1:7", "udp:127.0.0.1:7")
    assert_dropped(server.proc.pid)
    with connect(tcp) as s:
        s.sendall(b"echoed by nobody")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"echoed by nobody"
    reply, _ = datagram_exchange(udp, b"datagram")
    assert reply == b"datagram"
    assert server.stop() == 0


@ROOT_ONLY
def test_every_worker_and_the_parent_serve_as_nobody(cli: type[CLIProcess]) -> None:
    require_port(7, socket.SOCK_STREAM)
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:7", "--user", "nobody",
                  "--group", "nogroup", "--workers", "2"])
    [tcp] = server.wait_listening(1)
    workers = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    for pid in [server.proc.pid, *map(int, workers)]:
        assert_dropped(pid)
    for _ in range(4):
        with connect(tcp) as s:
            s.sendall(b"a worker of nobody's")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"a worker of nobody's"
    # A replacement worker is forked from the dropped parent: nobody too.
    os.kill(int(workers[0]), signal.SIGKILL)
    server.wait_for("starting another")
    replacement: set[str] = set()
    deadline = time.monotonic() + 10
    while len(replacement) != 1 and time.monotonic() < deadline:
        now = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                             text=True).stdout.split()
        replacement = set(now) - set(workers)
    assert len(replacement) == 1
    assert_dropped(int(replacement.pop()))
    assert server.stop() == 0


# -- config files -----------------------------------------------------------


@ROOT_ONLY
@pytest.mark.parametrize("given", ["in the file", "with --user"])
def test_config_file_server_user(cli: type[CLIProcess], place: Callable[[int], Path],
                                 given: str) -> None:
    here = place(0o755)
    quotes = write(here / "quotes.txt", "Served by nobody, from a file.\n")
    documented = tomllib.loads(example("toml", "[server]"))
    assert documented["server"] == {"user": "nobody"}  # the group: nobody's own
    documented["services"]["qotd"]["quotes"] = str(quotes)
    documented["services"]["qotd"]["listen"] = ["tcp:127.0.0.1:0"]
    extra = []
    if given == "with --user":
        del documented["server"]
        extra = ["--user", "nobody"]
    conf = write(here / "server.toml", _toml(documented))
    server = cli(["serve", "--config", str(conf), *extra])
    [endpoint] = server.wait_listening(1)
    assert_dropped(server.proc.pid, gid=NOBODY.pw_gid)
    with connect(endpoint) as s:
        assert recv_all(s) == b"Served by nobody, from a file.\r\n"
    assert server.stop() == 0


@ROOT_ONLY
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers"])
def test_a_reload_to_a_root_nobody_can_read_fails_and_the_old_one_serves(
    cli: type[CLIProcess], place: Callable[[int], Path], workers: list[str]
) -> None:
    here = place(0o755)
    good = here / "good"
    good.mkdir(mode=0o755)
    write(good / "hello.txt", "still served\n")
    closed = place(0o700)  # root's alone
    conf = write(here / "s.toml", f'[services.gopher]\nlisten = ["tcp:127.0.0.1:0"]\n'
                                  f'root = "{good}"\n')
    server = cli(["serve", "--config", str(conf), "--user", "nobody", *workers])
    [endpoint] = server.wait_listening(1)
    write(conf, f'[services.gopher]\nlisten = ["tcp:127.0.0.1:0"]\nroot = "{closed}"\n')
    server.send_signal(signal.SIGHUP)
    failed = server.wait_for(r"reload failed: .*; still serving the configuration loaded before")
    assert str(closed) in failed.string, failed.string
    with connect(endpoint) as s:
        s.sendall(b"/hello.txt\r\n")
        assert recv_all(s) == b"still served\r\n.\r\n"
    assert server.stop() == 0


@ROOT_ONLY
def test_a_reload_to_a_program_nobody_cannot_run_fails_at_reload(
    cli: type[CLIProcess], place: Callable[[int], Path]
) -> None:
    here = place(0o755)
    mine = write(here / "mine.sh", "#!/bin/sh\necho root only\n", mode=0o700)
    conf = write(here / "s.toml", '[services.hello]\nservice = "exec"\n'
                                  'listen = ["tcp:127.0.0.1:0"]\nexec = ["/bin/echo", "hello"]\n')
    server = cli(["serve", "--config", str(conf), "--user", "nobody", "--workers", "2"])
    [endpoint] = server.wait_listening(1)
    write(conf, '[services.hello]\nservice = "exec"\n'
                f'listen = ["tcp:127.0.0.1:0"]\nexec = ["{mine}"]\n')
    server.send_signal(signal.SIGHUP)
    # Said once, at the reload, not at every connection after it.
    failed = server.wait_for(r"reload failed: .*; still serving the configuration loaded before")
    assert str(mine) in failed.string, failed.string
    with connect(endpoint) as s:
        assert recv_all(s) == b"hello\n"
    assert server.stop() == 0


def _toml(data: dict[str, dict[str, object]]) -> str:
    """The little TOML these tests write: tables of strings and lists."""
    out = []
    for name, table in data.items():
        if name == "services":
            for service, settings in table.items():
                assert isinstance(settings, dict)
                out.append(f"[services.{service}]")
                out += [f"{k} = {_value(v)}" for k, v in settings.items()]
        else:
            out.append(f"[{name}]")
            out += [f"{k} = {_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def _value(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    assert isinstance(v, str)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- programs run as the user ---------------------------------------------


@ROOT_ONLY
def test_exec_program_runs_as_nobody(cli: type[CLIProcess]) -> None:
    args = command(example("sh", "sudo sockworks serve exec"))
    args = [a.replace("127.0.0.1:7000", "127.0.0.1:0") for a in args]
    server = cli(args)
    [endpoint] = server.wait_listening(1)
    with connect(endpoint) as s:
        answer = recv_all(s).decode()
    nobody, nogroup = NOBODY.pw_uid, NOGROUP.gr_gid
    documented = f"uid={nobody}(nobody) gid={nogroup}(nogroup) groups={nogroup}(nogroup)"
    assert answer.strip() == documented
    assert f"`{documented}`" in DOC
    assert server.stop() == 0


@ROOT_ONLY
def test_gopher_scripts_run_as_nobody(cli: type[CLIProcess], place: Callable[[int], Path]) -> None:
    root = place(0o755)
    write(root / "whoami", "#!/bin/sh\nid -u\nid -G\n", mode=0o755)
    server = cli(["serve", "gopher", "--root", str(root), "--exec-scripts",
                  "-l", "tcp:127.0.0.1:0", "--user", "nobody", "--group", "nogroup"])
    [endpoint] = server.wait_listening(1)
    with connect(endpoint) as s:
        s.sendall(b"whoami\r\n")
        page = recv_all(s).decode()
    assert page.split()[:2] == [str(NOBODY.pw_uid), str(NOGROUP.gr_gid)], page
    assert server.stop() == 0


# -- errors at start, before anything binds ---------------------------------


@ROOT_ONLY
@pytest.mark.parametrize("option,name,what", [
    ("--user", "nosuch-sockworks-user", "user"),
    ("--group", "nosuch-sockworks-group", "group"),
])
def test_unknown_user_or_group_is_one_line(place: Callable[[int], Path], option: str,
                                           name: str, what: str) -> None:
    sock = place(0o755) / "echo.sock"
    result = run_cli("serve", "echo", "-l", f"unix:{sock}", option, name)
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"unknown {what} {name!r}")
    assert not sock.exists()  # nothing was bound


@ROOT_ONLY
def test_unknown_user_in_a_config_file(place: Callable[[int], Path]) -> None:
    here = place(0o755)
    conf = write(here / "bad.toml", '[server]\nuser = "nosuch-sockworks-user"\n'
                 f'[services.echo]\nlisten = ["unix:{here}/echo.sock"]\n')
    result = run_cli("serve", "--config", str(conf))
    assert result.returncode == 2
    assert one_error_line(result).startswith("unknown user 'nosuch-sockworks-user'")
    assert not (here / "echo.sock").exists()


@ROOT_ONLY
def test_unreadable_gopher_root_is_an_error_at_start(place: Callable[[int], Path]) -> None:
    private = place(0o700)  # root's own: root could serve it, nobody cannot
    write(private / "secret.txt", "root only\n")
    sock = place(0o755) / "gopher.sock"
    result = run_cli("serve", "gopher", "--root", str(private), "-l", f"unix:{sock}",
                     "--user", "nobody")
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(f"gopher: user nobody cannot list the gopher root '{private}' "
                           "(Permission denied)"), line
    assert not sock.exists()  # checked before binding
    # The line the docs show is this line.
    shown = example("text", "cannot list the gopher root").splitlines()[1]
    assert shown.replace("/root/private", str(private)) == result.stderr.decode().strip()
    # Readable by nobody, the same command serves.
    private.chmod(0o755)
    (private / "secret.txt").chmod(0o644)
    assert required_paths_as_nobody(["gopher", "--root", str(private)]) is None


def required_paths_as_nobody(args: list[str]) -> str | None:
    """The check alone, in this process: what ``serve ARGS --user nobody``
    would refuse at start (None: nothing)."""
    from sockworks.cli import build_parser
    from sockworks.cli.serve import service_config
    from sockworks.services import get_service

    parsed = build_parser().parse_args(["serve", *args, "-l", "tcp:127.0.0.1:0"])
    config = service_config(get_service(parsed.service), parsed, parsed.listen)
    try:
        check_as(resolve("nobody", None), required_paths([config]))
    except PrivilegeError as exc:
        return str(exc)
    return None


@ROOT_ONLY
def test_unreadable_quotes_file_is_an_error_at_start(place: Callable[[int], Path]) -> None:
    here = place(0o755)
    quotes = write(here / "quotes.txt", "Root reads this at start.\n", mode=0o600)
    result = run_cli("serve", "qotd", "--quotes", str(quotes), "-l", f"unix:{here}/q.sock",
                     "--user", "nobody")
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(f"qotd: user nobody cannot read the quotes file '{quotes}' "
                           "(Permission denied)"), line
    assert not (here / "q.sock").exists()
    quotes.chmod(0o644)
    assert required_paths_as_nobody(["qotd", "--quotes", str(quotes)]) is None


@ROOT_ONLY
def test_exec_program_nobody_cannot_run_is_an_error_at_start(
    place: Callable[[int], Path],
) -> None:
    private = place(0o700)
    program = write(private / "hello", "#!/bin/sh\necho hello\n", mode=0o755)
    result = run_cli("serve", "exec", "-l", "tcp:127.0.0.1:0", "--user", "nobody",
                     "--", str(program))
    assert result.returncode == 1
    assert one_error_line(result).startswith(
        f"exec: user nobody cannot run the program '{program}' (Permission denied)")
    # A working directory nobody cannot enter, with a program it can run.
    result = run_cli("serve", "exec", "-l", "tcp:127.0.0.1:0", "--user", "nobody",
                     "--workdir", str(private), "--", "true")
    assert result.returncode == 1
    assert one_error_line(result).startswith(
        f"exec: user nobody cannot enter the working directory '{private}'")


@ROOT_ONLY
def test_tls_key_only_root_can_read_is_an_error_at_start(place: Callable[[int], Path]) -> None:
    trustme = pytest.importorskip("trustme")
    here = place(0o755)
    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(here / "cert.pem"))
    cert.private_key_pem.write_to_path(str(here / "key.pem"))
    (here / "cert.pem").chmod(0o644)
    (here / "key.pem").chmod(0o600)  # read again on SIGHUP, as nobody: it could not
    result = run_cli("serve", "echo", "-l", "tls:127.0.0.1:0", "--cert", str(here / "cert.pem"),
                     "--key", str(here / "key.pem"), "--user", "nobody")
    assert result.returncode == 1
    assert one_error_line(result).startswith(
        f"echo: user nobody cannot read the private key '{here / 'key.pem'}'")


@ROOT_ONLY
def test_unreadable_config_file_and_app_directory(place: Callable[[int], Path]) -> None:
    here = place(0o755)
    conf = write(here / "root-only.toml", '[services.echo]\nlisten = ["tcp:127.0.0.1:0"]\n',
                 mode=0o600)
    result = run_cli("serve", "--config", str(conf), "--user", "nobody")
    assert result.returncode == 1
    assert one_error_line(result).startswith(f"user nobody cannot read the config file '{conf}'")
    app = place(0o700)
    write(app / "privapp.py", "async def handle(stream):\n    await stream.write(b'x')\n")
    result = run_cli("serve", "privapp:handle", "--app-dir", str(app), "-l", "tcp:127.0.0.1:0",
                     "--user", "nobody")
    assert result.returncode == 1
    assert one_error_line(result).startswith(
        f"privapp:handle: user nobody cannot list the directory of privapp '{app}'")


# -- Unix sockets -------------------------------------------------------------


@ROOT_ONLY
@pytest.mark.parametrize("directory", ["root's", "sticky"])
def test_unix_socket_is_given_to_the_user(cli: type[CLIProcess], place: Callable[[int], Path],
                                          directory: str) -> None:
    nc = require_peer("nc")
    here = place(0o755 if directory == "root's" else 0o1777)
    path = here / "echo.sock"
    server = cli(["serve", "echo", "-l", f"unix:{path}", "--user", "nobody", "--group", "nogroup"])
    server.wait_listening(1)
    st = path.lstat()
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOGROUP.gr_gid)
    # A client running as nobody may connect (it needs write permission on
    # the file); one running as another user may not.
    as_nobody = subprocess.run([nc, "-N", "-U", str(path)], input=b"hi from nobody",
                               capture_output=True, timeout=10, user="nobody",
                               group="nogroup", extra_groups=[])
    assert as_nobody.stdout == b"hi from nobody", as_nobody
    other = pwd.getpwnam("daemon")
    as_other = subprocess.run([nc, "-N", "-U", str(path)], input=b"hi", capture_output=True,
                              timeout=10, user=other.pw_uid, group=other.pw_gid,
                              extra_groups=[])
    assert as_other.stdout == b"" and b"ermission denied" in as_other.stderr, as_other
    stays = "will stay after shutdown"
    assert server.stop() == 0
    assert "Traceback" not in server.log
    if directory == "root's":
        # nobody cannot remove a file from root's directory: said at start,
        # no error at exit; the next start (as root) removes the stale file.
        assert stays in server.log and path.exists()
        again = cli(["serve", "echo", "-l", f"unix:{path}"])
        again.wait_listening(1)
        assert again.stop() == 0 and not path.exists()
    else:
        assert stays not in server.log and not path.exists()


# -- the module itself ----------------------------------------------------------


def in_child(work: Callable[[], object]) -> str:
    """``work()`` in a forked child (ids changed there stay there): its
    result, or its exception as ``Name: message``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out = f"ok: {work()}"
        except BaseException as exc:  # reported to the parent
            out = f"{type(exc).__name__}: {exc}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    return data


def test_resolve_names() -> None:
    assert resolve(None, None) is None
    if os.geteuid() != 0:
        pytest.skip("the rest needs root: switching users")
    both = resolve("nobody", "nogroup")
    assert both is not None and (both.uid, both.gid) == (NOBODY.pw_uid, NOGROUP.gr_gid)
    alone = resolve("nobody", None)  # the user's primary group
    assert alone is not None and alone.gid == NOBODY.pw_gid and alone.home == NOBODY.pw_dir
    group_only = resolve(None, "nogroup")
    assert group_only is not None and group_only.uid is None and str(group_only).startswith(
        "group nogroup")
    by_number = resolve(str(NOBODY.pw_uid), None)
    assert by_number is not None and by_number.user == "nobody"
    with pytest.raises(ConfigError, match="unknown user 'nosuch-sockworks-user'"):
        resolve("nosuch-sockworks-user", None)
    with pytest.raises(ConfigError, match="unknown group 'nosuch-sockworks-group'"):
        resolve("nobody", "nosuch-sockworks-group")


@ROOT_ONLY
def test_not_root_says_so_unless_already_that_user() -> None:
    def as_nobody(work: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            os.setgroups([])
            os.setresgid(NOGROUP.gr_gid, NOGROUP.gr_gid, NOGROUP.gr_gid)
            os.setresuid(NOBODY.pw_uid, NOBODY.pw_uid, NOBODY.pw_uid)
            return work()
        return run

    refused = in_child(as_nobody(lambda: resolve("root", None)))
    assert refused.startswith("PrivilegeError: --user root: only root can switch to another user")
    refused = in_child(as_nobody(lambda: resolve("nobody", "root")))
    assert refused.startswith("PrivilegeError: --group root: only root can switch groups")
    assert in_child(as_nobody(lambda: resolve("nobody", None))) == "ok: None"  # nothing to do


@ROOT_ONLY
def test_drop_holds_and_cannot_be_undone() -> None:
    credentials = resolve("nobody", "nogroup")
    assert credentials is not None

    def dropped() -> object:
        os.setgroups([0, 4])  # supplementary groups to be cleared
        drop(credentials)
        try:
            os.setuid(0)
        except PermissionError:
            regained = False
        else:
            regained = True
        return (os.getresuid(), os.getresgid(), os.getgroups(), regained,
                os.environ["HOME"], os.environ["USER"], os.environ["LOGNAME"])

    nobody, nogroup = NOBODY.pw_uid, NOGROUP.gr_gid
    assert in_child(dropped) == "ok: " + str(
        ((nobody,) * 3, (nogroup,) * 3, [], False, NOBODY.pw_dir, "nobody", "nobody"))


@ROOT_ONLY
def test_verify_catches_a_drop_that_did_not_happen() -> None:
    # Still root: verifying as if nobody must refuse (every id, and setuid(0)).
    claimed = Credentials(NOBODY.pw_uid, NOGROUP.gr_gid, "nobody", "nogroup")
    verdict = in_child(lambda: _verify(claimed))
    assert verdict.startswith("PrivilegeError: dropping to user nobody"), verdict
    assert "user ids are (0, 0, 0)" in verdict and "setuid(0) succeeded" in verdict


@ROOT_ONLY
def test_check_as_names_the_first_unusable_path(place: Callable[[int], Path]) -> None:
    from sockworks._privileges import RequiredPath

    private = place(0o700)
    open_dir = place(0o755)
    write(open_dir / "ok.txt", "fine\n")
    nobody = resolve("nobody", None)
    check_as(nobody, [RequiredPath(str(open_dir), "root", "list"),
                      RequiredPath(str(open_dir / "ok.txt"), "file")])  # no error
    with pytest.raises(PrivilegeError, match=f"user nobody cannot list the root '{private}'"):
        check_as(nobody, [RequiredPath(str(open_dir), "root", "list"),
                          RequiredPath(str(private), "root", "list")])
    # This process kept its privileges: the probe dropped in a child.
    assert os.geteuid() == 0 and stat.S_IMODE(private.stat().st_mode) == 0o700


def test_systemd_unit_in_the_docs_verifies() -> None:
    analyze = require_peer("systemd-analyze")
    unit = example("ini", "AmbientCapabilities=CAP_NET_BIND_SERVICE")
    with tempfile.TemporaryDirectory() as here:
        # The unit as written, but for where sockworks is installed here.
        sockworks = str(Path(sys.executable).parent / "sockworks")
        path = Path(here) / "sockworks-gopher.service"
        path.write_text(unit.replace("/usr/bin/sockworks", sockworks) + "\n")
        result = subprocess.run([analyze, "verify", "--man=no", str(path)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and path.name not in result.stderr, result.stderr



def test_only_sockets_bound_here_are_given_away() -> None:
    from types import SimpleNamespace

    from sockworks._privileges import unix_socket_paths

    server = SimpleNamespace(endpoints=[
        ("a", SimpleNamespace(transport="unix", path="/run/a.sock", fd=None)),
        ("b", SimpleNamespace(transport="unixgram", path="/run/b.sock", fd=None)),
        # Passed by systemd: its file is the service manager's, never chowned.
        ("c", SimpleNamespace(transport="unix", path="/run/c.sock", fd=3)),
        ("d", SimpleNamespace(transport="tcp", path="", fd=None)),
    ])
    assert unix_socket_paths(server) == ["/run/a.sock", "/run/b.sock"]
