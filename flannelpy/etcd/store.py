"""The interface the agent needs from etcd, whatever the API version.

Both implementations (v3, over the JSON gateway or gRPC, and v2 over the keys API) return the
shared types from flannelpy.subnet.lease, so the lease logic above them is the same.
"""

from __future__ import annotations

import logging
import ssl
from ipaddress import IPv4Network, IPv6Network
from typing import Any, AsyncIterator, NamedTuple, Protocol

from flannelpy.errors import FlannelError
from flannelpy.subnet.lease import Lease, LeaseAttrs, LeaseEvent

from .diagnose import TLS, UNREACHABLE, ConnectFailure, TLSSetup
from .transport_choice import check_transport

log = logging.getLogger("flanneld.etcd")

# Lease.expiration of a lease listed or watched with expiry=False whose key has a TTL: the store
# did not ask etcd when it ends (v3: one TimeToLive round trip per lease).  Not None, which
# means "no TTL, a reservation"; later than any real time, so nothing treats it as expired.
EXPIRY_NOT_READ = float("inf")


class _EtcdFlags(NamedTuple):
    """Connection settings, straight from flanneld's -etcd-* flags."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    prefix: str = "/coreos.com/network"
    keyfile: str = ""
    certfile: str = ""
    cafile: str = ""
    username: str = ""
    password: str = ""
    request_timeout: float = 5.0
    # v3 only: "auto" (the JSON gateway; etcd's gRPC API where the gateway cannot serve),
    # "gateway" or "grpc" (transport_choice.py says why).
    transport: str = "auto"


class EtcdOptions(_EtcdFlags):
    """The -etcd-* flags, checked.  A record rather than a dataclass: it is defined at every start."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> EtcdOptions:
        self = super().__new__(cls, *args, **kwargs)
        check_transport(self.transport)  # a bad -etcd-transport fails at start, naming the flag
        return self


def tls_context(options: EtcdOptions) -> ssl.SSLContext | bool:
    """httpx's `verify` for the -etcd-cafile/-etcd-certfile/-etcd-keyfile flags.

    A file that cannot be read is a FlannelError naming the flag and the file, at start-up,
    rather than a handshake failure on every request later.
    """
    if not (options.cafile or options.certfile or options.keyfile):
        return True
    try:
        ctx = ssl.create_default_context(cafile=options.cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise FlannelError(f"-etcd-cafile={options.cafile}: cannot load the CA certificate: {exc}") from None
    if options.certfile and options.keyfile:
        try:
            ctx.load_cert_chain(options.certfile, options.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise FlannelError(f"-etcd-certfile={options.certfile} -etcd-keyfile={options.keyfile}: "
                               f"cannot load the client certificate: {exc}") from None
    elif options.certfile or options.keyfile:
        # flanneld also ignores a lone cert or key; say so instead of failing later in the handshake
        log.warning("etcd TLS: both -etcd-certfile and -etcd-keyfile are needed for a client certificate; "
                    "connecting without one")
    return ctx


def httpx_verify(options: EtcdOptions) -> ssl.SSLContext | bool:
    """tls_context for an httpx client, False when every endpoint is plain http:// and no TLS
    flag is given: no handshake can happen then, and httpx builds its default context (the CA
    bundle: 50-200 ms here, once per client and -etcd-api auto makes two) eagerly for True."""
    if not (options.cafile or options.certfile or options.keyfile) and not any(
            e.strip().lower().startswith("https://") for e in options.endpoints):
        return False
    return tls_context(options)


def tls_setup(options: EtcdOptions) -> TLSSetup:
    """The TLS flags and what the client certificate says, to name a refused handshake later."""
    facts = None
    if options.certfile:
        from .certfacts import CertificateFormatError, parse_pem  # only with a client certificate

        try:
            with open(options.certfile, "rb") as fh:
                facts = parse_pem(fh.read())
        except (OSError, CertificateFormatError):
            pass  # tls_context (or gRPC) reports an unreadable file itself
    return TLSSetup(cafile=options.cafile, certfile=options.certfile if options.keyfile else "", client_cert=facts)


class StoreUnavailable(FlannelError):
    """No endpoint could be used; the caller retries.

    `kind` is diagnose.UNREACHABLE, or diagnose.TLS when an endpoint refused the TLS handshake
    (the message then says which certificate is wrong and what to do).
    """

    def __init__(self, message: str, kind: str = UNREACHABLE) -> None:
        super().__init__(message)
        self.kind = kind


def unavailable(failures: list[ConnectFailure]) -> StoreUnavailable:
    """The error after every endpoint failed: each distinct failure once, TLS ones named as such."""
    texts = list(dict.fromkeys(f.text for f in failures))
    if any(f.kind == TLS for f in failures):
        return StoreUnavailable("; ".join(texts), kind=TLS)
    return StoreUnavailable("no etcd endpoint answered: " + "; ".join(texts), kind=UNREACHABLE)


class WatchBatch(NamedTuple):
    """What one watch step yields.

    Normally `events` holds the changes since the last batch.  When the store could not
    resume (compaction, v2 index cleared) it re-lists: `snapshot` then holds every
    current lease and the consumer diffs it against what it knew.
    """

    events: tuple[LeaseEvent, ...] = ()
    snapshot: tuple[Lease, ...] | None = None
    revision: int = 0
    skipped: tuple[str, ...] = ()  # keys whose values could not be decoded


class Store(Protocol):
    """A flannel subnet registry in etcd (the v3 and v2 implementations share it)."""

    options: EtcdOptions
    # EnableIPv6: leases are read from dual-stack keys too (`10.5.52.0-24&fc00::-64`,
    # lease.parse_store_key); set by the agent once the config is read.  The writes below take the
    # IPv6 subnet of such a key as `ipv6_subnet` (None: an IPv4 key).
    dual_stack: bool

    async def get_config(self) -> str | None:
        """The raw JSON at <prefix>/config, or None when the key does not exist."""

    async def list_leases(self, *, expiry: bool = True) -> tuple[list[Lease], int]:
        """Every decodable lease under <prefix>/subnets/ and the revision (v2: index) read at.

        expiry=False: a lease's expiration may be EXPIRY_NOT_READ (what the agent asks for peers,
        whose expiry it never reads; v2 has it in the listing anyway)."""

    async def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        """The lease stored for one subnet with its expiry, or None."""

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                           ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        """Create the key only if it does not exist; None when someone else holds it."""

    async def renew_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                          ipv6_subnet: IPv6Network | None = None) -> Lease:
        """Write the key with a fresh TTL (ttl=0: no TTL, a reservation stays one)."""

    async def time_left(self, lease: Lease) -> float | None:
        """Seconds until a listed lease's TTL runs out, where a read that is neither a write nor a
        consensus round can tell (v3: the etcd lease's TimeToLive); None where it cannot (v2, whose
        reads are quorum reads, as costly as the renewal they would spare) or the lease is gone."""

    async def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> None:
        """Remove the key (used for an incompatible lease of ours)."""

    def watch_leases(self, after_revision: int, *, expiry: bool = True) -> AsyncIterator[WatchBatch]:
        """Changes after `after_revision`, forever; reconnects, resumes and re-lists itself
        (expiry as for list_leases)."""

    async def aclose(self) -> None:
        ...


class SkipLog:
    """Warns once per distinct bad lease value; a periodic re-list would otherwise repeat the same
    warning for the same garbage key every time, burying everything else in the log."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[str] = set()

    def skipped(self, reason: Exception) -> None:
        message = f"skipping lease: {reason}"
        if message in self._seen:
            self._logger.debug("%s", message)
            return
        if len(self._seen) > 10_000:  # bounded, in case someone writes garbage keys in a loop
            self._seen.clear()
        self._seen.add(message)
        self._logger.warning("%s (logged once per value)", message)
