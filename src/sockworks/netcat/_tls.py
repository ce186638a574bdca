"""TLS contexts for connect and listen, and one clear line per TLS failure."""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass

from .._errors import UsageError
from .._tls import half_close_friendly, reason_text, tls_failure_reason


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """``--tls`` and its companions.

    The client verifies the chain and the host name against the system
    store unless ``insecure``; ``cafile`` replaces the system store. The
    listener needs ``cert`` (and ``key`` unless the cert file holds it);
    ``require_client_cert`` makes it demand a client certificate signed by
    ``cafile``.
    """

    cafile: str | None = None
    servername: str | None = None
    insecure: bool = False
    cert: str | None = None
    key: str | None = None
    require_client_cert: bool = False


def client_context(options: TLSOptions) -> ssl.SSLContext:
    # create_default_context: TLS 1.2+, the system CA store, host name
    # checking: what a browser would accept and nothing less.
    try:
        context = ssl.create_default_context(cafile=options.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --cafile {options.cafile}: {reason_text(exc)}") from None
    half_close_friendly(context)
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.cert:
        _load_chain(context, options)
    return context


def server_context(options: TLSOptions) -> ssl.SSLContext:
    if not options.cert:
        raise UsageError("listen --tls needs --cert (and --key unless the cert file holds it)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    half_close_friendly(context)
    _load_chain(context, options)
    if options.require_client_cert:
        if not options.cafile:
            raise UsageError("--require-client-cert needs --cafile, the CA that signs clients")
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=options.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load --cafile {options.cafile}: {reason_text(exc)}") from None
    return context


def _load_chain(context: ssl.SSLContext, options: TLSOptions) -> None:
    assert options.cert is not None
    try:
        context.load_cert_chain(options.cert, options.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load certificate {options.cert}: {reason_text(exc)}") from None


def describe_tls_error(exc: ssl.SSLError, where: str, servername: str | None = None) -> str:
    """One line for a failed handshake: expired, wrong host, unknown CA…"""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH / IP_ADDRESS_MISMATCH
            what = f"certificate is not valid for host {servername!r}" if servername else (
                "certificate is not valid for this host name")
        else:
            what = tls_failure_reason(exc)
        return f"TLS: cannot verify the certificate of {where}: {what}"
    what = tls_failure_reason(exc)
    if what == "the peer closed the connection mid-TLS":
        return f"TLS with {where} failed: {what}"
    return f"TLS handshake with {where} failed: {what}"


class TLSStream:
    """TLS over a non-blocking socket, through memory BIOs.

    Why not :class:`ssl.SSLSocket`: netcat half-closes (stdin EOF → "no
    more from me", then keep reading). In TLS that is a close_notify alert.
    ``SSLSocket`` can only send one through ``unwrap()``, which also reads
    the socket looking for the peer's close_notify and fails the whole
    connection if application data arrives instead; and a bare TCP FIN
    without close_notify is a fatal "unexpected EOF" to OpenSSL 3 peers
    (ncat, socat) still sending. With memory BIOs we send close_notify, then
    keep reading with ``SSL_read``, which TLS allows.

    It offers the few socket methods the relay uses: ``fileno``, ``send``,
    ``recv_into``, ``pending``, ``do_handshake``, ``close``.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)
        self._raw = bytearray()  # encrypted, not yet accepted by the kernel
        self._eof_in = False
        self._closing = False
        self._notified = False
        self._aborting = False
        self._fin_sent = False
        # Whether the peer ever sent a byte: one that connects and closes
        # without a word (a port probe) has not failed a handshake.
        self.received = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def has_output(self) -> bool:
        return bool(self._raw) or self._out.pending > 0 or self._fin_due

    @property
    def finished_sending(self) -> bool:
        """close_notify and the FIN are out, with everything queued before them."""
        return self._fin_sent and not self._raw and not self._out.pending

    @property
    def _fin_due(self) -> bool:
        return (self._notified or self._aborting) and not self._fin_sent

    def flush(self) -> bool:
        """Send what is encrypted; True when nothing is left."""
        if self._out.pending:
            self._raw += self._out.read()
        while self._raw:
            try:
                sent = self.sock.send(self._raw)
            except BlockingIOError:
                return False
            del self._raw[:sent]
        if self._fin_due:
            self._fin_sent = True
            try:
                # After close_notify, the FIN: for peers that read the raw socket.
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return True

    def _fill(self) -> bool:
        """Move what the kernel has into the TLS object; False if nothing."""
        if self._eof_in:
            return False
        try:
            data = self.sock.recv(256 * 1024)
        except BlockingIOError:
            return False
        if data:
            self.received = True
            self._in.write(data)
        else:
            self._eof_in = True
            self._in.write_eof()
        return True

    def do_handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                flushed = self.flush()
                if self._fill():
                    continue
                if not flushed:
                    raise ssl.SSLWantWriteError("want write") from None
                raise
            self.flush()
            return

    def handshake(self, timeout: float | None) -> None:
        """The client's handshake, waiting at most ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sock.setblocking(False)
        while True:
            try:
                self.do_handshake()
                break
            except ssl.SSLWantReadError:
                readable, writable = [self.sock], []
            except ssl.SSLWantWriteError:
                readable, writable = [], [self.sock]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("TLS handshake timed out")
            if not any(select.select(readable, writable, [], left)[:2]):
                raise TimeoutError("TLS handshake timed out")
        while self._raw or self._out.pending:
            if not self.flush() and not select.select([], [self.sock], [], 1.0)[1]:
                break  # a peer that takes nothing: the relay sends the rest

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        while True:
            try:
                return int(self.obj.read(len(buffer), buffer))
            except ssl.SSLWantReadError:
                if not self._fill():
                    self._close_notify()  # if one is due: now nothing is unread
                    self.flush()  # post-handshake messages (tickets, key updates)
                    raise
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0  # close_notify, or a bare FIN: both mean "no more"

    def send(self, data: bytes | memoryview) -> int:
        if (self._raw or self._out.pending) and not self.flush():
            raise BlockingIOError("TLS output backlog")
        written = self.obj.write(data)
        self.flush()
        return written

    def pending(self) -> int:
        return self.obj.pending() + self._in.pending

    def half_close(self) -> None:
        """close_notify (then a FIN): the peer sees EOF; we keep reading."""
        self._closing = True
        self._close_notify()
        self.flush()

    def _close_notify(self) -> None:
        # unwrap() sends our close_notify, then looks for the peer's in what
        # has arrived: application data there would be a fatal error, so it
        # waits until everything received has been read (recv_into calls
        # again when it has drained the input).
        if not self._closing or self._notified or self._in.pending or self.obj.pending():
            return
        self._notified = True
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: ours is sent, theirs has not come (and need not)

    def start_abort(self) -> None:
        """After a failed handshake, without blocking: queue the alert that
        says why, then a FIN. The caller keeps the socket a moment, calling
        :meth:`flush` when writable and :meth:`drain` when readable:
        closing with the peer's data unread would send RST, and the RST can
        destroy the alert before the peer reads it."""
        self._aborting = True
        self.flush()

    def drain(self) -> bool:
        """Read and drop what the peer still sends; True at its EOF (or error)."""
        try:
            for _ in range(16):  # bounded: a peer that floods us gets closed later
                if not self.sock.recv(65536):
                    return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        return False

    def abort(self) -> None:
        """After a failed handshake, when nothing else waits on us (a
        connect, a one-connection listen that is ending): the alert, then
        up to a second for the peer's FIN, blocking."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(bytes(self._raw) + self._out.read())
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and self.sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self, *, wait: bool = True) -> None:
        """Close; ``wait``: first spend up to a second sending what is left
        (end of a session), else one try without blocking (one of many)."""
        if self._raw or self._out.pending:
            try:
                if wait:
                    self.sock.settimeout(1.0)
                    self.sock.sendall(bytes(self._raw) + self._out.read())
                else:
                    self.flush()
            except OSError:
                pass
        self.sock.close()
