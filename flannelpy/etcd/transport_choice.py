"""Which transport carries etcd v3 requests: the JSON gateway (httpx) or etcd's gRPC API (grpcio).

The gateway is the default because it costs nothing extra: httpx is loaded anyway, whereas
grpcio adds about 21 MiB of RSS and 60 ms of imports (README, "Libraries, and why"). It cannot
serve one classic kind of TLS cluster, though: etcd's gateway dials etcd's own gRPC port
presenting the *server* certificate as a client certificate, and with --client-cert-auth a
server certificate whose extendedKeyUsage is serverAuth only is refused, so every /v3 request
answers HTTP 503, gRPC code 14 with the gateway's own dial error ("broken pipe", "connection
reset", "use of closed network connection"). etcdctl, flanneld and any gRPC client work on
the same cluster. `-etcd-transport=auto` therefore starts on the gateway and moves to gRPC on
exactly that answer. Pure: the caller probes and acts.
"""

from __future__ import annotations

from typing import NamedTuple

from flannelpy.errors import UsageError

TRANSPORT_CHOICES = ("auto", "gateway", "grpc")
GATEWAY = "gateway"
GRPC = "grpc"
_UNAVAILABLE = 14  # gRPC status code the gateway maps its failed dial to

# What to do when the gateway cannot serve and gRPC is not an option.
_FIX = ("etcd's JSON gateway presents etcd's server certificate to etcd itself, so with --client-cert-auth that "
        "certificate needs extendedKeyUsage=serverAuth,clientAuth")


def check_transport(transport: str) -> str:
    """The transport name, or UsageError naming the bad value."""
    if transport not in TRANSPORT_CHOICES:
        raise UsageError(f'invalid value "{transport}" for -etcd-transport: must be auto, gateway or grpc')
    return transport


def gateway_cannot_serve(scheme: str, status: int, code: int | None, message: str) -> bool:
    """True when a gateway answer means "this gateway can never serve", not "etcd is busy".

    The signature: TLS to the endpoint worked (scheme https and an HTTP answer came back), the
    answer is 503 with gRPC code 14, and the message is the gateway's own network error rather
    than one of etcd's ("etcdserver: no leader", "etcdserver: request timed out", ...).
    """
    if scheme != "https" or status != 503 or code != _UNAVAILABLE:
        return False
    return not message.strip().lower().startswith("etcdserver:")


class TransportDecision(NamedTuple):
    transport: str | None  # GATEWAY, GRPC, or None: neither can work (message says why)
    message: str  # the one log line (or the error) stating the choice and its reason


def initial_transport(setting: str) -> TransportDecision:
    """The transport to start on for -etcd-transport=setting, before any request."""
    if check_transport(setting) == GRPC:
        return TransportDecision(GRPC, "etcd v3 transport: gRPC (-etcd-transport=grpc)")
    reason = "(-etcd-transport=gateway)" if setting == GATEWAY else \
        "(-etcd-transport=auto: the gateway answers; gRPC only where it cannot serve)"
    return TransportDecision(GATEWAY, f"etcd v3 transport: JSON gateway {reason}")


def after_gateway_failure(setting: str, endpoint: str, failure: str, grpc_available: bool | str) -> TransportDecision:
    """The decision once the gateway at `endpoint` answered with the cannot-serve signature.

    grpc_available: True, or the reason grpcio cannot be imported.
    """
    seen = f"etcd's JSON gateway at {endpoint} cannot serve: {failure}"
    if check_transport(setting) == GATEWAY:
        return TransportDecision(None, f"{seen}. {_FIX}; or run with -etcd-transport=auto to use etcd's gRPC API")
    if grpc_available is not True:
        return TransportDecision(None, f"{seen}, and etcd's gRPC API needs grpcio, which cannot be imported "
                                       f"({grpc_available}); reinstall flannelpy (pip install flannelpy), or: {_FIX}")
    return TransportDecision(GRPC, f"etcd v3 transport: gRPC, because {seen} (the gateway presents etcd's "
                                   "server certificate to etcd itself, which --client-cert-auth refuses without "
                                   "clientAuth usage)")
