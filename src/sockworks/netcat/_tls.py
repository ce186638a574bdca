"""TLS contexts for connect and listen, and one clear line per TLS failure."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from .._errors import UsageError


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
        raise UsageError(f"cannot load --cafile {options.cafile}: {_reason(exc)}") from None
    _half_close_friendly(context)
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
    _half_close_friendly(context)
    _load_chain(context, options)
    if options.require_client_cert:
        if not options.cafile:
            raise UsageError("--require-client-cert needs --cafile, the CA that signs clients")
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=options.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load --cafile {options.cafile}: {_reason(exc)}") from None
    return context


def _half_close_friendly(context: ssl.SSLContext) -> None:
    # netcat's half-close is a TCP FIN (see docs/netcat.md): OpenSSL 3 would
    # otherwise treat a FIN without close_notify as a fatal error and refuse
    # to send the rest of our data after the peer finished sending its own.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def _load_chain(context: ssl.SSLContext, options: TLSOptions) -> None:
    assert options.cert is not None
    try:
        context.load_cert_chain(options.cert, options.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load certificate {options.cert}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
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


def describe_tls_error(exc: ssl.SSLError, where: str, servername: str | None = None) -> str:
    """One line for a failed handshake: expired, wrong host, unknown CA…"""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH / IP_ADDRESS_MISMATCH
            what = f"certificate is not valid for host {servername!r}" if servername else (
                "certificate is not valid for this host name")
        else:
            what = _VERIFY_CODES.get(code) or str(exc.verify_message or exc.reason)
        return f"TLS: cannot verify the certificate of {where}: {what}"
    reason = str(exc.reason or "").upper()
    if "WRONG_VERSION_NUMBER" in reason or "UNKNOWN_PROTOCOL" in reason or (
        "RECORD_LAYER_FAILURE" in reason
    ):
        return f"TLS handshake with {where} failed: the peer does not speak TLS"
    if "UNKNOWN_CA" in reason:
        return f"TLS handshake with {where} failed: the peer does not trust our certificate's CA"
    if "CERTIFICATE_REQUIRED" in reason or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
        return f"TLS handshake with {where} failed: a client certificate is required"
    if "CERTIFICATE_EXPIRED" in reason:
        return f"TLS handshake with {where} failed: the peer says our certificate has expired"
    if "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return f"TLS handshake with {where} failed: the peer rejected the certificate"
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
        return f"TLS with {where} failed: the peer closed the connection mid-TLS"
    text = reason.lower().replace("_", " ") if reason else str(exc)
    return f"TLS handshake with {where} failed: {text}"
