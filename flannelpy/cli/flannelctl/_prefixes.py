"""Which etcd prefixes hold a flannel network, to name the right one when a command finds nothing.

A wrong --etcd-prefix otherwise looks like an empty network.  etcd cannot be asked "which prefixes
are flannel networks" without reading every key, so the usual ones are looked at: flanneld's default
/coreos.com/network, the RHEL packages' /atomic.io/network, and the prefix flanneld's settings on this
host name (FLANNELD_ETCD_PREFIX, /etc/sysconfig/flanneld).
"""

from __future__ import annotations

from dataclasses import dataclass

from flannelpy.errors import FlannelError
from flannelpy.etcd.select import make_store
from flannelpy.etcd.store import EtcdOptions

WELL_KNOWN = ("/coreos.com/network", "/atomic.io/network")


@dataclass(frozen=True)
class Found:
    prefix: str
    api: str
    has_config: bool
    leases: int

    def describe(self) -> str:
        what = [w for w in ("a config" if self.has_config else "",
                            f"{self.leases} lease{'s' if self.leases != 1 else ''}" if self.leases else "") if w]
        return f"{self.prefix} ({' and '.join(what)}, etcd {self.api})"


def candidates(current: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Pure: the prefixes to look at besides `current`, each once, trailing slashes ignored."""
    seen = {current.rstrip("/")}
    out = []
    for p in (*WELL_KNOWN, *extra):
        key = p.rstrip("/")
        if key and key not in seen:
            seen.add(key)
            out.append(key)
    return out


async def look(options: EtcdOptions, api: str, prefix: str) -> Found | None:
    """What one prefix holds through one API; None when nothing (or when etcd cannot say)."""
    store = make_store(options._replace(prefix=prefix), api)
    try:
        config = await store.get_config()
        leases, _ = await store.list_leases()
    except FlannelError:
        return None
    finally:
        await store.aclose()
    if config is None and not leases:
        return None
    return Found(prefix, api, config is not None, len(leases))


async def find_networks(options: EtcdOptions, api: str, extra: tuple[str, ...] = ()) -> list[Found]:
    """The other prefixes that hold a config or leases, through `api` (both APIs for "auto")."""
    apis = ("v3", "v2") if api == "auto" else (api,)
    found = []
    for prefix in candidates(options.prefix, extra):
        for a in apis:
            hit = await look(options, a, prefix)
            if hit is not None:
                found.append(hit)
    return found


def hint(current: str, found: list[Found]) -> str:
    """Pure: the sentence naming the prefixes that do hold a network (or saying none was found)."""
    if not found:
        return (f"no flannel network at the usual prefixes either ({', '.join(WELL_KNOWN)}); "
                f"is this the etcd your agents use?")
    names = "; ".join(f.describe() for f in found)
    return f"found {names}: use --etcd-prefix {found[0].prefix}"
