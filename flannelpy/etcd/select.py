"""Which etcd API to talk to, and waiting until the network config exists.

flanneld <= 0.17 reads the config through the v2 keys API, >= 0.18 through v3, and the two
keyspaces are separate (reference §3.6, §9 item 4): a config written with the "other"
etcdctl is invisible.  With api="auto" we probe both and say exactly what we found and
which command would create the key, once, instead of failing silently in a loop.  An etcd
that refuses us (TLS, auth, permissions) or answers with an error is reported as exactly that,
with what to do, and never as a missing key.

The v3 transport (-etcd-transport: the JSON gateway, or etcd's gRPC API where the gateway
cannot serve) is chosen inside the v3 store, so the agent and every flannelctl command that
opens a store here get the same choice (transport_choice.py).
"""

from __future__ import annotations

import logging
import sys
from typing import NamedTuple

import httpx
import trio

from flannelpy.errors import FlannelError, UsageError

from .diagnose import API_DISABLED, TLS, UNREACHABLE
from .store import EtcdOptions, Store, StoreUnavailable

API_CHOICES = ("v3", "v2", "auto")
EXAMPLE_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
DEFAULT_ENDPOINTS = EtcdOptions().endpoints


def check_api(api: str) -> str:
    """The API name, or UsageError naming the bad value."""
    if api not in API_CHOICES:
        raise UsageError(f'invalid etcd API "{api}": must be v3, v2 or auto')
    return api


def make_store(options: EtcdOptions, api: str) -> Store:
    """A store for one concrete API ("v3" or "v2"); no I/O."""
    _httpcore_without_h2()
    if check_api(api) == "v2":
        from .v2 import V2Store  # imported late, like v3: a v3 cluster's start never needs it

        return V2Store(options)
    if api == "v3":
        from .v3 import V3Store  # imported late: v3 is optional for v2-only users and tests

        return V3Store(options)
    raise UsageError('etcd API "auto" must be resolved first (see open_store)')


def _httpcore_without_h2() -> None:
    """Load httpcore (httpx loads it with the first client) without its HTTP/2 half: httpcore
    imports h2 whenever it is installed (hypercorn brings it), ~40 ms of start-up for a protocol
    the etcd clients never speak (no client asks for http2).  Once httpcore is loaded, h2 is
    importable again for whoever needs it."""
    if "httpcore" in sys.modules or "h2" in sys.modules:
        return  # nothing left to save
    sys.modules["h2"] = None  # type: ignore[assignment]  # `import h2` raises ImportError meanwhile
    try:
        import httpcore  # noqa: F401
    finally:
        if sys.modules.get("h2", 0) is None:
            del sys.modules["h2"]


def config_key(options: EtcdOptions) -> str:
    return options.prefix.rstrip("/") + "/config"


def create_command(options: EtcdOptions, api: str, config: str = EXAMPLE_CONFIG) -> str:
    """The etcdctl command line that writes <prefix>/config through `api`."""
    endpoints = "" if options.endpoints == DEFAULT_ENDPOINTS else f" --endpoints={','.join(options.endpoints)}"
    if api == "v2":
        return f"ETCDCTL_API=2 etcdctl{endpoints} mk {config_key(options)} '{config}'"
    return f"etcdctl{endpoints} put {config_key(options)} '{config}'"


class Probe(NamedTuple):
    """What one API said about <prefix>/config."""

    api: str
    config: str | None
    state: str  # found | missing | disabled | unreachable | tls | error
    detail: str

    def describe(self) -> str:
        return f"{self.api}: {self.detail}"


async def probe(store: Store, api: str) -> Probe:
    """Read the config through one store and classify the answer (never raises for etcd trouble)."""
    key = config_key(store.options)
    try:
        config = await store.get_config()
    except StoreUnavailable as exc:
        if exc.kind == API_DISABLED:
            return Probe(api, None, "disabled", "API disabled (start etcd with --enable-v2=true)")
        if exc.kind == TLS:
            return Probe(api, None, TLS, str(exc))
        return Probe(api, None, UNREACHABLE, f"unreachable ({exc})")
    except (FlannelError, httpx.HTTPError) as exc:  # a v2 error document is a FlannelError too
        return Probe(api, None, "error", f"error reading {key}: {exc}")
    if config is None:
        return Probe(api, None, "missing", f"no key {key}")
    return Probe(api, config, "found", f"found {key}")


def choose(probes: list[Probe]) -> Probe | None:
    """The probe to use, in preference order, or None to keep waiting.

    A later API is only chosen when every earlier one definitely has no key: if v3 is
    merely unreachable, an old v2 config must not win by accident.
    """
    for p in probes:
        if p.state == "found":
            return p
        if p.state not in ("missing", "disabled"):
            return None
    return None


def _describe_all(probes: list[Probe]) -> str:
    """"v3: ...; v2: ..." with one entry for APIs that failed the same way (a refused certificate)."""
    by_detail: dict[str, list[str]] = {}
    for p in probes:
        by_detail.setdefault(p.detail, []).append(p.api)
    return "; ".join(f"{', '.join(apis)}: {detail}" for detail, apis in by_detail.items())


def failure_message(options: EtcdOptions, probes: list[Probe]) -> str | None:
    """Why the config could not be read when etcd failed or refused us; None when every probe
    got a real answer (the key is there, missing, or the API is disabled)."""
    if all(p.state in ("found", "missing", "disabled") for p in probes):
        return None
    if all(p.state == UNREACHABLE for p in probes):
        return f"cannot reach etcd at {','.join(options.endpoints)} ({_describe_all(probes)})"
    failed = [p for p in probes if p.state not in ("found", "missing", "disabled")]
    return f"cannot read {config_key(options)} from etcd: {_describe_all(failed)}"


def waiting_message(options: EtcdOptions, probes: list[Probe], retry_interval: float) -> str:
    """One log line (plus commands) saying why we are still waiting."""
    found = "; ".join(p.describe() for p in probes)
    failure = failure_message(options, probes)
    if failure is not None:
        return f"{failure}; retrying every {retry_interval:g}s"
    lines = [f"flannel network config not found in etcd (probed {found}); waiting for it, "
             f"retrying every {retry_interval:g}s. Create it with:"]
    lines += [f"  {create_command(options, p.api)}" for p in probes]
    return "\n".join(lines)


async def _close_all(stores: list[Store]) -> None:
    with trio.CancelScope(shield=True):
        for s in stores:
            await s.aclose()


async def _probe_in_order(options: EtcdOptions, apis: list[str], stores: dict[str, Store]) -> list[Probe]:
    """Ask each API in turn for the config, making its store on first use (into `stores`), and
    stop at the first that holds it: an earlier API holding the key wins, whatever the later ones
    hold, and a v3 config found needs no v2 client nor request."""
    probes: list[Probe] = []
    for a in apis:
        if a not in stores:
            stores[a] = make_store(options, a)
        probes.append(await probe(stores[a], a))
        if probes[-1].state == "found":
            break
    return probes


async def open_store(options: EtcdOptions, api: str) -> Store:
    """A store for "v3" or "v2"; "auto" probes once: where the config is (v3 first), else v3."""
    if check_api(api) != "auto":
        return make_store(options, api)
    stores: dict[str, Store] = {}
    try:
        probes = await _probe_in_order(options, ["v3", "v2"], stores)
    except BaseException:
        await _close_all(list(stores.values()))
        raise
    chosen = next((p.api for p in probes if p.state == "found"), "v3")
    await _close_all([s for a, s in stores.items() if a != chosen])
    return stores[chosen]


async def wait_for_config(options: EtcdOptions, api: str, *, log: logging.Logger,
                          retry_interval: float = 1.0) -> tuple[Store, str]:
    """Retry until <prefix>/config exists; (the store it was read from, its raw text).

    Each distinct situation (unreachable, key missing, v2 disabled, ...) is logged once.
    """
    apis = ["v3", "v2"] if check_api(api) == "auto" else [api]
    stores: dict[str, Store] = {}  # made on first use (_probe_in_order)
    last_situation: tuple[tuple[str, str], ...] | None = None
    try:
        while True:
            probes = await _probe_in_order(options, apis, stores)
            chosen = choose(probes)
            if chosen is not None and chosen.config is not None:
                await _close_all([s for a, s in stores.items() if a != chosen.api])
                log.info("using etcd %s API: network config at %s", chosen.api, config_key(options))
                return stores[chosen.api], chosen.config
            situation = tuple((p.api, p.state, p.detail if p.state == TLS or p.state == "error" else "")
                              for p in probes)
            if situation != last_situation:
                log.warning("%s", waiting_message(options, probes, retry_interval))
                last_situation = situation
            await trio.sleep(retry_interval)
    except BaseException:
        await _close_all(list(stores.values()))
        raise

