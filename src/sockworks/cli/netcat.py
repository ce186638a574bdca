"""``sockworks connect`` and ``sockworks listen``: netcat from the terminal."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from .._config import SocketOptions
from .._endpoint import Endpoint, parse_endpoint, reject_url
from .._errors import BindError, SockworksError, UsageError
from ..netcat import (
    Hooks,
    NetcatOptions,
    TLSOptions,
    connect,
    describe_error,
    exec_connect,
    exec_listen,
    listen,
    parse_command,
    scan,
    split_host_ports,
)
from ._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, examples, fail, positive_int, seconds

CONNECT_EXAMPLES = examples(
    ("echo hello | sockworks connect 127.0.0.1:7007", "send a line, print the answer"),
    ("sockworks connect --tls example.org:443", "TLS, certificate verified"),
    ("sockworks connect --zero 127.0.0.1:20-25,7000-7100", "list open TCP ports"),
    ("sockworks connect --exec 'sha256sum' 127.0.0.1:9000",
     "the server's bytes in, their hash back"),
    ("sockworks connect --send-proxy v2 --proxy-source 203.0.113.7:4000 127.0.0.1:7007",
     "test a PROXY listener: say the client is 203.0.113.7"),
)
LISTEN_EXAMPLES = examples(
    ("sockworks listen tcp:127.0.0.1:0 > got.bin", "one peer's bytes into a file"),
    ("sockworks listen -k udp:127.0.0.1:9000", "print every datagram"),
    ("sockworks listen -k --sh-exec 'echo \"hello $REMOTE_ADDR\"; cat' tcp:127.0.0.1:9000",
     "a program per client"),
)


def register(sub: Any) -> None:
    c = sub.add_parser(
        "connect", help="talk to a socket service: stdin to it, it to stdout",
        description="Connect to ENDPOINT; send stdin to it and print what comes back. "
        "At stdin EOF the write side is shut down and output continues until the peer "
        "closes. With --zero, ENDPOINT is HOST:PORTS and the open TCP ports are listed. "
        "With --exec/--sh-exec a program's stdin and stdout are the connection, and the "
        "exit status is the program's.",
        epilog=CONNECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("endpoint", metavar="ENDPOINT",
                   help="tcp:HOST:PORT, udp:HOST:PORT, unix:PATH, unixgram:PATH (HOST:PORT "
                   "means TCP); with --zero: HOST:PORTS, e.g. 127.0.0.1:20-25,80")
    c.add_argument("-z", "--zero", action="store_true",
                   help="scan: report open TCP ports without sending data (TCP only: an "
                   "empty UDP answer cannot tell an open port from a filtered one)")
    c.add_argument("--concurrency", type=positive_int, default=100, metavar="N",
                   help="--zero: probes in flight at once (default 100)")
    c.add_argument("--source", "-s", metavar="ADDR[:PORT]",
                   help="local address (and port) to connect from; a path for unix")
    proxy = c.add_argument_group(
        "PROXY protocol", "send a PROXY header first, as HAProxy or nginx would (curl "
        "--haproxy-protocol): right after connecting, before TLS and before any data")
    proxy.add_argument("--send-proxy", choices=("v1", "v2"), metavar="v1|v2",
                       help="the header's version: v1 text or v2 binary")
    proxy.add_argument("--proxy-source", metavar="HOST:PORT",
                       help="the client address the header states (default: our real "
                       "local address); the destination is the address connected to")
    _common_options(c, listening=False)
    c.set_defaults(func=run_connect)

    p = sub.add_parser(
        "listen", help="accept a connection: stdin to it, it to stdout",
        description="Listen on ENDPOINT, accept one connection (more with --keep-open), "
        "send stdin to it and print what it sends. The bound endpoint is reported on "
        "stderr as 'listening on ENDPOINT' (port 0 picks a free port). With --exec/"
        "--sh-exec each connection runs a program whose stdin and stdout are the "
        "connection (with -k a program per client).",
        epilog=LISTEN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("endpoint", metavar="ENDPOINT", help="where to listen, as for serve")
    p.add_argument("-k", "--keep-open", action="store_true",
                   help="accept many connections at once; stdin goes to all")
    p.add_argument("--max-conns", type=positive_int, default=64, metavar="N",
                   help="with --keep-open: connections at once, more wait (default 64)")
    p.add_argument("--allow", action="append", default=[], metavar="ADDR/CIDR",
                   help="accept only these peers (repeatable)")
    p.add_argument("--deny", action="append", default=[], metavar="ADDR/CIDR",
                   help="refuse these peers (repeatable)")
    _common_options(p, listening=True)
    p.set_defaults(func=run_listen)


def _common_options(p: argparse.ArgumentParser, *, listening: bool) -> None:
    flow = p.add_argument_group("data")
    flow.add_argument("--no-shutdown", action="store_true",
                      help="at stdin EOF keep the write side open (no half-close)")
    flow.add_argument("--send-only", action="store_true",
                      help="only send stdin; discard what arrives")
    flow.add_argument("--recv-only", action="store_true",
                      help="only print what arrives; do not read stdin")
    flow.add_argument("--crlf", action="store_true", help="send LF as CRLF")
    flow.add_argument("--hex", action="store_true",
                      help="hex dump of both directions on stderr ('>' sent, '<' received)")
    flow.add_argument("--timeout", "-w", type=seconds, metavar="SECONDS",
                      help="wait for a peer: give up when none comes within this long "
                      "(for idle time see --idle-timeout)" if listening
                      else "connect timeout: give up connecting (and the TLS handshake) after "
                      "this long; --zero: per probe (default 1). Not idle time: see "
                      "--idle-timeout (in serve, --timeout is the idle timeout)")
    flow.add_argument("--idle-timeout", "-i", type=seconds, metavar="SECONDS",
                      help="give up when nothing moves for this long")
    flow.add_argument("--wait", type=seconds, default=2.0, metavar="SECONDS",
                      help="udp/unixgram: after stdin EOF, wait this long for more replies "
                      "(default 2)")
    flow.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=None,
                      help="prompt and show replies line by line (default: when stdin "
                      "is a terminal)")
    flow.add_argument("-v", "--verbose", action="store_true",
                      help="say on stderr when connections open and close")
    program = p.add_argument_group(
        "program", "run a program on the connection instead of relaying stdin/stdout; it "
        "gets PROTO, TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT, REMOTE_ADDR, "
        "REMOTE_PORT in its environment")
    command = program.add_mutually_exclusive_group()
    command.add_argument("--exec", "-e", dest="exec_command", metavar="'PROGRAM ARGS'",
                         help="run PROGRAM (split as a shell would, but no shell runs)")
    command.add_argument("--sh-exec", "-c", dest="sh_command", metavar="'COMMAND'",
                         help="run COMMAND with /bin/sh -c")
    net = p.add_argument_group("network")
    family = net.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET,
                        default=socket.AF_UNSPEC, help="IPv4 only")
    family.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6,
                        help="IPv6 only")
    net.add_argument("--nodelay", action=argparse.BooleanOptionalAction, default=False,
                     help="TCP_NODELAY (default off: netcat moves bulk data)")
    net.add_argument("--keepalive", action=argparse.BooleanOptionalAction, default=None,
                     help="SO_KEEPALIVE")
    net.add_argument("--sndbuf", type=positive_int, metavar="BYTES", help="SO_SNDBUF")
    net.add_argument("--rcvbuf", type=positive_int, metavar="BYTES", help="SO_RCVBUF")
    net.add_argument("--broadcast", action="store_true", default=None,
                     help="SO_BROADCAST (udp)")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="speak TLS")
    tls.add_argument("--handshake-timeout", type=seconds, default=10.0, metavar="SECONDS",
                     help="a TLS handshake that takes longer fails (default 10; 0: no limit)"
                     + ("; unfinished handshakes also give way to newcomers at --max-conns"
                        if listening else ""))
    tls.add_argument("--cafile", metavar="PEM",
                     help="CAs to trust instead of the system store"
                     + ("; with --require-client-cert, the CA of clients" if listening else ""))
    if listening:
        tls.add_argument("--cert", metavar="PEM", help="the certificate chain to present")
        tls.add_argument("--key", metavar="PEM", help="its private key (if not in --cert)")
        tls.add_argument("--require-client-cert", action="store_true",
                         help="demand a client certificate signed by --cafile")
    else:
        tls.add_argument("--servername", metavar="NAME",
                         help="the name to send (SNI) and verify (default: the host)")
        tls.add_argument("--insecure", action="store_true",
                         help="do not verify the certificate (encryption without identity)")
        tls.add_argument("--cert", metavar="PEM", help="a client certificate to present")
        tls.add_argument("--key", metavar="PEM", help="its private key (if not in --cert)")


def _options(args: argparse.Namespace, *, listening: bool) -> NetcatOptions:
    tls = None
    if args.tls:
        tls = TLSOptions(
            cafile=args.cafile,
            servername=getattr(args, "servername", None),
            insecure=getattr(args, "insecure", False),
            cert=args.cert,
            key=args.key,
            require_client_cert=getattr(args, "require_client_cert", False),
        )
    interactive = args.interactive
    if interactive is None:
        # --exec: the program, not the terminal, has the connection.
        interactive = (os.isatty(0) and not args.recv_only and args.exec_command is None
                       and args.sh_command is None)
    return NetcatOptions(
        shutdown=not args.no_shutdown,
        crlf=args.crlf,
        send_only=args.send_only,
        recv_only=args.recv_only,
        connect_timeout=args.timeout or None,
        handshake_timeout=args.handshake_timeout or None,
        idle_timeout=args.idle_timeout or None,
        family=args.family,
        source=getattr(args, "source", None),
        socket_options=SocketOptions(nodelay=False).updated(
            nodelay=args.nodelay, keepalive=args.keepalive, sndbuf=args.sndbuf,
            rcvbuf=args.rcvbuf, broadcast=args.broadcast,
        ),
        tls=tls,
        keep_open=getattr(args, "keep_open", False),
        max_conns=getattr(args, "max_conns", 64),
        allow=tuple(getattr(args, "allow", ())),
        deny=tuple(getattr(args, "deny", ())),
        interactive=interactive,
        datagram_wait=args.wait,
        send_proxy=getattr(args, "send_proxy", None),
        proxy_source=getattr(args, "proxy_source", None),
    )


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _hooks(args: argparse.Namespace) -> Hooks:
    def event(text: str) -> None:
        _stderr(f"sockworks: {text}\n")

    def listening(endpoint: Endpoint) -> None:
        _stderr(f"sockworks: listening on {endpoint}\n")

    return Hooks(
        hexdump=_stderr if args.hex else None,
        prompt=lambda: _stderr("> "),
        listening=listening,
        event=event if args.verbose else None,
        warning=event,  # failed TLS handshakes of listen -k: shown without -v
    )


def _std_fds_open() -> None:
    """Started with stdin/stdout closed (`<&-`): put /dev/null there, or the
    socket would get fd 0 or 1 and be mistaken for them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def run_connect(args: argparse.Namespace) -> int:
    if args.zero:
        if _command(args) is not None:
            raise UsageError("--zero scans ports; it cannot run --exec/--sh-exec")
        if args.send_proxy is not None:
            raise UsageError("--zero scans ports and sends nothing; --send-proxy does not apply")
        return _run_zero(args)
    return _run_relay(connect, args, listening=False)


def run_listen(args: argparse.Namespace) -> int:
    return _run_relay(listen, args, listening=True)


def _run_relay(relay: Callable[..., None], args: argparse.Namespace, *, listening: bool) -> int:
    """Run ``connect`` or ``listen`` from the command line."""
    endpoint = parse_endpoint(args.endpoint)
    options = _options(args, listening=listening)
    command = _command(args)
    _std_fds_open()
    _stop_on_sigterm()
    try:
        if command is not None:
            run = exec_listen if listening else exec_connect
            # The program's exit status is ours (128 + N if killed by signal N).
            return run(endpoint, command, options, hooks=_hooks(args))
        relay(endpoint, options, hooks=_hooks(args))
    except KeyboardInterrupt:
        pass
    except BindError as exc:  # it names the endpoint itself; the system said no
        return fail(str(exc), EXIT_ERROR)
    except UsageError as exc:  # the person's mistake (no such program…): status 2
        return fail(str(exc), EXIT_USAGE)
    except SockworksError as exc:
        return fail(str(exc), EXIT_ERROR)
    except OSError as exc:  # the safety net: one line, never a traceback
        return fail(describe_error(exc, str(endpoint)), EXIT_ERROR)
    return EXIT_OK


def _command(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--exec / --sh-exec as an argv; None when neither is given."""
    if args.exec_command is None and args.sh_command is None:
        return None
    if args.hex:
        raise UsageError("--hex does not apply with --exec/--sh-exec "
                         "(the program has the connection)")
    if args.sh_command is not None:
        return parse_command(args.sh_command, shell=True)
    return parse_command(args.exec_command)


def _run_zero(args: argparse.Namespace) -> int:
    text: str = args.endpoint
    reject_url(text)
    transport = text.partition(":")[0]
    if transport in ("udp", "unix", "unixgram"):
        raise UsageError(
            f"--zero scans TCP ports only, not {transport} (a UDP port that answers "
            "nothing may be open or filtered): write HOST:PORTS, e.g. 127.0.0.1:20-25,80"
        )
    host, ports = split_host_ports(text)
    timeout = args.timeout or 1.0
    _std_fds_open()
    _stop_on_sigterm()
    try:
        found = scan(host, ports, timeout=timeout, concurrency=args.concurrency,
                     family=args.family)
    except KeyboardInterrupt:
        return EXIT_OK
    shown = f"[{host}]" if ":" in host else host
    for port in found:
        sys.stdout.write(f"tcp:{shown}:{port} open\n")
    sys.stdout.flush()
    if not found:
        return fail(f"no open TCP port on {host} among {len(ports)} probed", EXIT_ERROR)
    return EXIT_OK
