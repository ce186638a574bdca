"""Executable files as dynamic Gopher pages (``serve gopher --exec-scripts``).

The protocol (:class:`~sockworks.protocols.gopher.GopherProtocol`) decides
*what* runs: a regular file its root resolved (inside the root, no device,
no hidden or ``..`` component), executable by the server, when scripts are
on. This module *runs* it, on one of the core's threads for work that waits
(``Reply(offload=..., offload_waits=True)``), and bounds it:

* never a shell: the file itself is executed (its ``#!`` line, if any, is
  the kernel's business), with no arguments, stdin ``/dev/null``, its
  working directory the script's own directory, and an environment built
  from scratch (:func:`script_environment`): nothing of the server's;
* a time limit: SIGTERM to the script's process group, then SIGKILL
  :data:`KILL_AFTER` seconds later; the child is always reaped before the
  answer goes out (no zombie), and whatever it left running in its process
  group is killed once it exits;
* a cap on its output, read as it comes: over the cap the script is
  stopped and the client gets a type-3 error (never a truncated item), so
  memory per script is bounded by the cap;
* its standard error to the log, bounded (:data:`STDERR_BYTES`,
  :data:`STDERR_LINES`), each line escaped;
* at most ``max_running`` scripts at once per service; beyond that a
  request is answered "busy" at once rather than queued.

The environment follows Gophernicus (and the Bucktooth names pygopherd
shares): see :func:`script_environment` and docs/gopher.md "Dynamic pages".
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import threading
import time

from ..protocols.gopher import ScriptCall, ScriptResult

log = logging.getLogger("sockworks.gopher")

# A script's PATH: the system's programs, nothing of the server's own PATH
# (a virtualenv's or a user's directories a page must not depend on).
SCRIPT_PATH = "/usr/bin:/bin"
# A page is small and quick: 10 s is long for a person waiting on a menu,
# short enough that a stuck script frees its slot.
DEFAULT_TIMEOUT = 10.0
# Bytes of output kept per script; more is an error, not a truncated item.
# Bounds memory: max_running x this (64 MiB at the defaults).
DEFAULT_MAX_OUTPUT = 4 << 20
# Scripts running at once per service: below the core's 32 threads for
# waiting work, so that a burst of slow scripts cannot take them all.
DEFAULT_MAX_RUNNING = 16
# After the SIGTERM of a timeout, the script gets this long to exit before
# SIGKILL; the client waits for it, so it is short.
KILL_AFTER = 2.0
# What of a script's standard error reaches the log: the first bytes and
# lines only (a chatty script cannot flood the log or the server's memory).
STDERR_BYTES = 4096
STDERR_LINES = 20
READ_CHUNK = 65536

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escaped(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def script_environment(call: ScriptCall, root: str, version: str = "0") -> dict[str, str]:
    """The whole environment of a script: CGI's names as Gophernicus sets
    them (and pygopherd's ``REMOTE_PORT``/``REMOTE_HOST``), ``PATH``
    :data:`SCRIPT_PATH`, nothing else."""
    env = {
        "PATH": SCRIPT_PATH,
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": f"sockworks/{version}",
        "SERVER_PROTOCOL": "RFC1436",
        "REQUEST_METHOD": "GET",
        "CONTENT_LENGTH": "0",
        "SERVER_NAME": call.host,
        "SERVER_HOST": call.host,
        "SERVER_PORT": str(call.port),
        "DOCUMENT_ROOT": root,
        "SCRIPT_NAME": call.script,
        "SCRIPT_FILENAME": call.path,
        # Bucktooth's names: the selector as asked (with its ?query), the
        # script's own selector, the search string after the TAB.
        "SELECTOR": call.selector,
        "REQUEST": call.script,
        "QUERY_STRING": call.query,
        "SEARCHREQUEST": call.search,
        "GOPHER_FILETYPE": call.item_type,
        "GOPHER_CHARSET": "UTF-8",
    }
    if call.remote_host:  # an IP client (a Unix socket's has no address)
        env["REMOTE_ADDR"] = env["REMOTE_HOST"] = call.remote_host
        env["REMOTE_PORT"] = str(call.remote_port)
    return env


class ScriptRunner:
    """Runs the scripts of one Gopher service (see the module notes).
    Thread-safe: :meth:`run` is called on the core's waiting threads."""

    def __init__(
        self,
        root: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_running: int = DEFAULT_MAX_RUNNING,
        kill_after: float = KILL_AFTER,
        version: str = "0",
    ) -> None:
        self.root = root
        self.timeout = timeout
        self.max_output = max_output
        self.max_running = max_running
        self.kill_after = kill_after
        self.version = version
        self._slots = threading.BoundedSemaphore(max_running)
        self._lock = threading.Lock()
        self._running: set[int] = set()  # process groups, for stop_all
        self._stopped = False

    def is_script(self, path: str) -> bool:
        """Whether the resolved file ``path`` is run rather than served: a
        regular file the server may execute."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)

    def stop_all(self) -> None:
        """The service is stopping: kill every script still running (their
        threads then see EOF and return) and run no more."""
        with self._lock:
            self._stopped = True
            groups = list(self._running)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)

    def run(self, call: ScriptCall) -> ScriptResult:
        """Run one script to the end; never raises for what the script does."""
        if not self._slots.acquire(blocking=False):
            return ScriptResult(b"", "busy: too many scripts running",
                                "Too many scripts running; try again later", busy=True)
        try:
            result, errors = self._run(call)
        finally:
            self._slots.release()
        self._report(call, result, errors)
        return result

    def _report(self, call: ScriptCall, result: ScriptResult, errors: bytes) -> None:
        level = logging.INFO if result.failure is None else logging.WARNING
        if result.failure is not None and not result.busy:
            log.warning("script %s: %s (answered with an error)", call.path, result.failure)
        lines = errors.decode("utf-8", "replace").splitlines()
        for line in lines[:STDERR_LINES]:
            log.log(level, "script %s: stderr: %s", call.path, _escaped(line))
        if len(lines) > STDERR_LINES or len(errors) >= STDERR_BYTES:
            log.log(level, "script %s: stderr: (more, not logged)", call.path)

    def _run(self, call: ScriptCall) -> tuple[ScriptResult, bytes]:
        with self._lock:
            if self._stopped:
                return ScriptResult(b"", "server stopping", "Server stopping"), b""
            try:
                proc = subprocess.Popen(
                    [call.path],
                    executable=call.path,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=os.path.dirname(call.path),
                    env=script_environment(call, self.root, self.version),
                    close_fds=True,  # no descriptor of the server leaks in
                    process_group=0,  # its own group: a timeout stops its children too
                    restore_signals=True,  # SIGPIPE at its default, as under a shell
                    bufsize=0,
                )
            except OSError as exc:
                why = exc.strerror or str(exc)
                return ScriptResult(b"", f"cannot run: {why}", "Script failed"), b""
            self._running.add(proc.pid)
        try:
            return self._collect(proc)
        except BaseException:
            self._stop(proc)  # never leave it running, whatever went wrong here
            raise
        finally:
            with self._lock:
                self._running.discard(proc.pid)

    def _collect(self, proc: subprocess.Popen[bytes]) -> tuple[ScriptResult, bytes]:
        """Read the script's output and errors until it is done, stopping it
        at the deadline or the cap; reap it."""
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + self.timeout
        out = bytearray()
        err = bytearray()
        failure: str | None = None
        pidfd = _pidfd(proc.pid)
        exited = False
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ, "exit")
            try:
                while True:
                    pipes_open = any(k.data != "exit" for k in sel.get_map().values())
                    if pidfd is None and not exited:
                        exited = proc.poll() is not None  # reaps it: no group kill then
                    if not pipes_open and (exited or pidfd is None):
                        break  # done (without a pidfd, proc.wait below bounds the rest)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        failure = f"timed out after {self.timeout:g} s"
                        break
                    # Without a pidfd an exit is only seen by polling.
                    events = sel.select(left if pidfd is not None else min(left, 0.1))
                    for key, _ in events:
                        if key.data == "exit":
                            exited = True
                            sel.unregister(key.fileobj)
                            # The script is done; what it left running in
                            # its group goes (the leader is not reaped yet,
                            # so the group's id cannot have been reused).
                            _signal_group(proc.pid, signal.SIGKILL)
                            continue
                        chunk = os.read(key.fd, READ_CHUNK)
                        if not chunk:
                            sel.unregister(key.fileobj)
                        elif key.data == "out":
                            out += chunk
                            if len(out) > self.max_output:
                                failure = f"output over {self.max_output} bytes"
                                break
                        elif len(err) < STDERR_BYTES:  # the rest is read and dropped
                            err += chunk[: STDERR_BYTES - len(err)]
                    if failure is not None:
                        break
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        if failure is not None:
            self._stop(proc)
        else:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failure = f"timed out after {self.timeout:g} s"
                self._stop(proc)
        proc.stdout.close()
        proc.stderr.close()
        if failure is None and proc.returncode != 0:
            failure = _status(proc.returncode)
        if failure is None:
            return ScriptResult(bytes(out)), bytes(err)
        client = (
            "Script timed out" if failure.startswith("timed out")
            else "Script output too large" if failure.startswith("output over")
            else "Script failed"
        )
        return ScriptResult(b"", failure, client), bytes(err)

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to its group, SIGKILL after ``kill_after``; reaped."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.kill_after)
        except subprocess.TimeoutExpired:
            pass
        # Its group, whether the leader went or not: children that ignored
        # the SIGTERM go too.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll the child instead
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


__all__ = ["ScriptRunner", "script_environment"]
