"""TLS pieces every part of sockworks shares: OpenSSL's failures in plain
words (never an OpenSSL source file name), and the context settings that
half-close needs."""

from __future__ import annotations

import re
import ssl
import time

from ._config import TLSSettings
from ._errors import CertificateError


def half_close_friendly(context: ssl.SSLContext) -> None:
    # netcat's half-close is a TCP FIN (see docs/netcat.md): OpenSSL 3 would
    # otherwise treat a FIN without close_notify as a fatal error and refuse
    # to send the rest of our data after the peer finished sending its own.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def reason_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# OpenSSL X509_V_ERR_* codes a person meets, in words.
_VERIFY_CODES = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate (unknown CA)",
    19: "certificate signed by an unknown CA (self-signed root not trusted)",
    20: "certificate signed by an unknown CA",
    21: "certificate signed by an unknown CA",
    23: "certificate has been revoked",
    26: "certificate is not for this purpose",
}


# OpenSSL's reason codes (``ssl.SSLError.reason``) a person meets in a
# handshake, in words; the first fragment found in the reason wins. The
# error's own text names OpenSSL source files ("(_ssl.c:1006)"): never shown.
_REASONS = (
    ("HTTPS_PROXY_REQUEST", "not TLS (an HTTP proxy request)"),
    ("HTTP_REQUEST", "not TLS (plaintext HTTP?)"),
    ("WRONG_VERSION_NUMBER", "not TLS (plaintext?)"),
    ("UNKNOWN_PROTOCOL", "not TLS (plaintext?)"),
    ("RECORD_LAYER_FAILURE", "not TLS (plaintext?)"),
    ("PACKET_LENGTH_TOO_LONG", "not TLS (plaintext?)"),
    ("UNSUPPORTED_PROTOCOL", "protocol version: no TLS version in common"),
    ("PROTOCOL_VERSION", "protocol version: no TLS version in common"),
    ("NO_PROTOCOLS_AVAILABLE", "protocol version: no TLS version in common"),
    ("VERSION_TOO_LOW", "protocol version: no TLS version in common"),
    ("UNKNOWN_CA", "the peer does not trust our certificate's CA (unknown CA)"),
    ("CERTIFICATE_REQUIRED", "a client certificate is required"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "a client certificate is required"),
    ("CERTIFICATE_EXPIRED", "the peer says our certificate has expired"),
    ("BAD_CERTIFICATE", "the peer rejected the certificate"),
    ("CERTIFICATE_UNKNOWN", "the peer rejected the certificate"),
    ("NO_SHARED_CIPHER", "no cipher in common"),
    ("HANDSHAKE_FAILURE", "the peer refused the handshake (no cipher or version in common?)"),
    ("DECRYPTION_FAILED", "corrupt TLS data"),
    ("BAD_RECORD_MAC", "corrupt TLS data"),
    ("DECODE_ERROR", "malformed TLS message"),
    ("LENGTH_MISMATCH", "malformed TLS message"),
)


def tls_failure_reason(exc: ssl.SSLError) -> str:
    """A failed handshake's cause in plain words ("not TLS (plaintext?)",
    "unknown CA", "protocol version…"), never an OpenSSL file name."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code) or plain_reason(
            str(exc.verify_message or exc.reason or "certificate verification failed"))
    reason = str(exc.reason or "").upper()
    for fragment, words in _REASONS:
        if fragment in reason:
            return words
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or "EOF" in reason:
        return "the peer closed the connection mid-TLS"
    if reason:
        return reason.lower().replace("_", " ")
    return plain_reason(exc.strerror or (str(exc.args[-1]) if exc.args else ""))


def plain_reason(text: str) -> str:
    # "[SSL: X] words (_ssl.c:1006)" -> "words"
    text = re.sub(r"^\[[^]]*\]\s*", "", text)
    return re.sub(r"\s*\([^()]*\.c:\d+\)", "", text).strip() or "TLS error"




def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The server context for a service's TLS listeners; a certificate or
    key that cannot be used is a :class:`CertificateError` naming the file."""
    # Purpose.CLIENT_AUTH: a server context with the library's secure
    # defaults (no SSLv3, no compression, forward secrecy first).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion[settings.min_version]
    half_close_friendly(context)
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (OSError, ssl.SSLError) as exc:
        what = settings.cert if settings.key is None else f"{settings.cert} with {settings.key}"
        raise CertificateError(f"cannot load certificate {what}: {reason_text(exc)}") from None
    _check_validity(settings.cert)
    if settings.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(
                f"cannot load the client CA {settings.client_ca}: {reason_text(exc)}"
            ) from None
    if settings.alpn:
        context.set_alpn_protocols(list(settings.alpn))
    return context


def _check_validity(path: str) -> None:
    """A certificate outside its validity period would make every verifying
    client fail: an error at start (and on reload, which keeps the old one)
    rather than a server nobody can use. Read with the ssl module's own
    decoder (a private helper, present since Python 3.0); where it is
    missing, nothing is checked."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return
    try:
        cert = decode(path)
        not_before = ssl.cert_time_to_seconds(cert["notBefore"])
        not_after = ssl.cert_time_to_seconds(cert["notAfter"])
    except (OSError, ssl.SSLError, KeyError, ValueError):
        return  # load_cert_chain accepted it; its dates are its own business
    now = time.time()
    if now > not_after:
        raise CertificateError(f"certificate {path} expired on {cert['notAfter']}")
    if now < not_before:
        raise CertificateError(f"certificate {path} is not valid before {cert['notBefore']}")


def peer_subject(cert: object) -> str | None:
    """A verified client certificate's subject, as ``CN=…,O=…`` (from
    ``getpeercert()``); None without one."""
    if not isinstance(cert, dict):
        return None
    parts = [
        f"{key}={value}"
        for rdn in cert.get("subject", ())
        for key, value in rdn
    ]
    return ",".join(parts) or None
