"""What an etcd failure means, in one line that says what to do.

Pure: error texts and facts in, a sentence out. The stores call `describe_connect_failure` when
an endpoint could not be used (TLS, refused, timed out) and `advice_for_etcd_error` when etcd
answered with an error, so neither the agent nor flannelctl ever calls a refused certificate
"config not found". (Records are NamedTuples: this module is imported at every start.)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

if TYPE_CHECKING:  # certfacts is imported only where a client certificate is given
    from .certfacts import CertFacts

# Failure kinds, as Probe states and in messages.
UNREACHABLE = "unreachable"
TLS = "tls"
API_DISABLED = "disabled"  # the server answers, but not this API (v2 without --enable-v2=true)


class ConnectFailure(NamedTuple):
    kind: str  # UNREACHABLE | TLS
    text: str  # one line: what failed, and what to do


class TLSSetup(NamedTuple):
    """The -etcd-* TLS flags as given, and what the client certificate says (None: none given or unreadable)."""

    cafile: str = ""
    certfile: str = ""
    client_cert: CertFacts | None = None


def error_text(exc: BaseException) -> str:
    """An exception's text with its causes: under trio, httpx's ConnectError wraps httpcore's,
    which wraps trio's BrokenResourceError, which wraps ssl's certificate error; only the last
    one says anything."""
    texts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 8:
        seen.add(id(cur))
        text = str(cur).strip()
        if text and not any(text in t for t in texts):
            texts.append(text)
        cur = cur.__cause__ or cur.__context__
    return ": ".join(texts) if texts else type(exc).__name__


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


# Texts of a server refusing our certificate: OpenSSL alerts (httpx) and gRPC core's wording.
# Go's TLS server sends "bad certificate" for an expired, wrong-usage or unknown-CA client
# certificate alike, and with TLS 1.3 the client only sees it on its first read, which gRPC
# core reports as "Unwrap failed (TSI_DATA_CORRUPTED)".
_PEER_REFUSED = ("alert bad certificate", "alert_bad_certificate", "alert certificate required",
                 "alert_certificate_required", "alert certificate expired", "alert_certificate_expired",
                 "alert unknown ca", "alert_unknown_ca", "alert unsupported certificate",
                 "alert_unsupported_certificate", "tsi_data_corrupted", "alert handshake failure")


def describe_client_cert_refused(endpoint: str, tls: TLSSetup, now: float) -> str:
    """etcd refused the TLS handshake over our client certificate: say which property is wrong."""
    who = f"etcd at {endpoint} refused the TLS client certificate"
    if not tls.certfile:
        return (f"etcd at {endpoint} requires a TLS client certificate (it runs with --client-cert-auth): "
                "give -etcd-certfile and -etcd-keyfile")
    cert = tls.client_cert
    if cert is not None:
        if now > cert.not_after:
            return f"{who} -etcd-certfile={tls.certfile}: it expired on {_day(cert.not_after)}; renew it"
        if now < cert.not_before:
            return (f"{who} -etcd-certfile={tls.certfile}: it is not valid before {_day(cert.not_before)} "
                    "(check this host's clock)")
        if not cert.allows("clientAuth"):
            usages = ",".join(sorted(cert.extended_key_usage or ()))
            return (f"{who} -etcd-certfile={tls.certfile}: its extendedKeyUsage ({usages}) does not allow client "
                    "authentication; use a certificate issued with extendedKeyUsage=clientAuth")
    return (f"{who} -etcd-certfile={tls.certfile}: it is not signed by a CA in etcd's --trusted-ca-file "
            "(or is otherwise invalid); use a client certificate from that CA")


# A TLS 1.3 server that refuses the client certificate sends its alert after the client has
# finished the handshake and then resets the connection; under trio the reset often arrives
# first, and all httpx says is "ReadError" (no text), so the alert is lost.
_BARE_CLOSE = ("readerror", "brokenresourceerror", "connection reset", "unexpected eof", "eof occurred",
               "server disconnected")


def _bare_close(low: str) -> bool:
    return low.strip() in ("readerror", "brokenresourceerror") or any(m in low for m in _BARE_CLOSE[2:])


def _closed_after_handshake(endpoint: str, tls: TLSSetup, now: float) -> ConnectFailure:
    """etcd closed a TLS connection without an answer: certain when our certificate is known bad,
    likely when we sent none; otherwise it may as well be a restart, so it stays "unreachable"."""
    cert = tls.client_cert
    if tls.certfile and cert is not None and (now > cert.not_after or now < cert.not_before
                                              or not cert.allows("clientAuth")):
        return ConnectFailure(TLS, describe_client_cert_refused(endpoint, tls, now))
    if not tls.certfile:
        return ConnectFailure(TLS, f"etcd at {endpoint} closed the connection after the TLS handshake: "
                                           "if it runs with --client-cert-auth it needs a client certificate; "
                                           "give -etcd-certfile and -etcd-keyfile")
    return ConnectFailure(UNREACHABLE, f"etcd at {endpoint} closed the connection after the TLS handshake: if this "
                                       f"persists, it refuses -etcd-certfile={tls.certfile} (is it signed by a CA in "
                                       "etcd's --trusted-ca-file?)")


def describe_connect_failure(endpoint: str, error_text: str, tls: TLSSetup, now: float | None = None) -> ConnectFailure:
    """Why one endpoint could not be used, from the error text of httpx/ssl or gRPC."""
    now = time.time() if now is None else now
    low = error_text.lower()
    host = urlsplit(endpoint).hostname or endpoint
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        if "mismatch" in low or "doesn't match" in low or "not valid for" in low:
            return ConnectFailure(TLS, f"TLS handshake with {endpoint} failed: etcd's server certificate does not name "
                                       f"{host} in its subjectAltName; use an endpoint address the certificate names")
        if "expired" in low:
            return ConnectFailure(TLS, f"TLS handshake with {endpoint} failed: etcd's server certificate has expired")
        ca = f"-etcd-cafile={tls.cafile}" if tls.cafile else "the system CAs (no -etcd-cafile given)"
        return ConnectFailure(TLS, f"TLS handshake with {endpoint} failed: etcd's server certificate is not signed by "
                                   f"{ca}; give -etcd-cafile the CA that signed etcd's --cert-file")
    if any(marker in low for marker in _PEER_REFUSED):
        return ConnectFailure(TLS, describe_client_cert_refused(endpoint, tls, now))
    if urlsplit(endpoint).scheme == "https" and _bare_close(low):
        return _closed_after_handshake(endpoint, tls, now)
    if "wrong version number" in low or "wrong_version_number" in low:
        return ConnectFailure(TLS, f"TLS handshake with {endpoint} failed: etcd there does not speak TLS; "
                                   "use http:// in -etcd-endpoints")
    if "ssl" in low or "tls" in low or "handshake" in low:
        return ConnectFailure(TLS, f"TLS handshake with {endpoint} failed: {error_text.strip()}")
    if "refused" in low:
        return ConnectFailure(UNREACHABLE, f"{endpoint}: connection refused (is etcd running there?)")
    if "timeout" in low or "timed out" in low or "deadline" in low:
        return ConnectFailure(UNREACHABLE, f"{endpoint}: no answer (timed out)")
    return ConnectFailure(UNREACHABLE, f"{endpoint}: {error_text.strip()}")


def advice_for_etcd_error(message: str, *, prefix: str = "/coreos.com/network", username: str = "") -> str:
    """What to do about an error etcd answered with ("" when there is nothing specific to say)."""
    low = message.lower()
    if "authentication failed" in low or "invalid user id or password" in low:
        return "check -etcd-username and -etcd-password"
    if "user name is empty" in low or "user name not found" in low:
        return "etcd has auth enabled: give -etcd-username and -etcd-password"
    if "permission denied" in low:
        user = username or "<user>"
        return (f"grant the etcd user read/write on {prefix.rstrip('/')}/: etcdctl role grant-permission "
                f"<role> --prefix=true readwrite {prefix.rstrip('/')}/ and etcdctl user grant-role {user} <role>")
    if "client sent an http request to an https server" in low:
        return "etcd expects TLS there: use https:// in -etcd-endpoints"
    return ""
