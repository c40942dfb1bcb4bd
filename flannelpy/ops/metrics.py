"""Prometheus metrics for one agent (flanneld has none; these are flannelpy's addition).

Every Metrics owns a private CollectorRegistry, so two agents (or two tests) in one
process never share or clash on metric names.  Values that the agent already keeps in
AgentState (lease expiry, peers) are read from it at scrape time rather than mirrored, so
they cannot drift; backend packet counters are read from a callable the backend provides.

The agent's own counters and histogram are plain numbers until the first scrape: only then is
prometheus_client (the text format's reference implementation, ~20 ms to import and ~1.2 MiB
with http.server, wsgiref... that its exposition module pulls in) loaded, so the start-up does
not pay for it and an agent nobody scrapes never holds it.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .state import AgentState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

log = logging.getLogger("flanneld.metrics")

# Seconds from a lease event arriving to the backend having programmed it: sub-millisecond
# for host-gw/udp table updates, up to seconds when netlink is slow or retried.
_PROGRAM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def __getattr__(name: str) -> Any:
    # CONTENT_TYPE is prometheus_client's; asking for it loads the library (a scrape does anyway)
    if name == "CONTENT_TYPE":
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Count:
    """A monotonic counter (prometheus_client's Counter without the library)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Buckets:
    """A histogram with fixed upper bounds (prometheus_client's Histogram without the library)."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out


def split_counter_name(name: str) -> tuple[str, str, str] | None:
    """Map a backend counter key to (metric, direction, reason).

    Keys follow `<tx|rx>_<packets|bytes|dropped...|no_route>` (udpforward.Counters):
    tx_packets -> ("packets", "tx", ""), rx_dropped_unknown_source -> ("drops", "rx",
    "unknown_source"), tx_no_route -> ("drops", "tx", "no_route"), tx_dropped -> ("drops",
    "tx", "other").  Anything else is None (ignored, so a new counter never breaks a scrape).
    """
    direction, _, rest = name.partition("_")
    if direction not in ("tx", "rx") or not rest:
        return None
    if rest in ("packets", "bytes"):
        return rest, direction, ""
    if rest == "dropped":
        return "drops", direction, "other"
    if rest.startswith("dropped_"):
        return "drops", direction, rest[len("dropped_"):]
    if rest == "no_route":
        return "drops", direction, "no_route"
    return None


def path_split(values: Mapping[str, int]) -> list[tuple[str, str, str, int]]:
    """(metric, path, direction, value) for a backend with a kernel fast path beside the Python one (udp's tc-BPF
    programs: their counters are `bpf_<tx|rx>_<packets|bytes>`, and `<tx|rx>_<packets|bytes>` are the totals over
    both paths).  The Python path's share is the total minus the BPF part.  [] for a backend without bpf_* counters.
    """
    if not any(key.startswith("bpf_") for key in values):
        return []
    out = []
    for metric in ("packets", "bytes"):
        for direction in ("tx", "rx"):
            bpf = values.get(f"bpf_{direction}_{metric}", 0)
            total = values.get(f"{direction}_{metric}", 0)
            out.append((metric, "bpf", direction, bpf))
            out.append((metric, "python", direction, max(total - bpf, 0)))
    return out


class _StateCollector:
    """The agent's counters and histogram, and gauges derived from AgentState and backend
    counters, computed at scrape time."""

    def __init__(self, owner: "Metrics") -> None:
        self.owner = owner

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: names are fixed below, registry need not pre-validate

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        for count in self.owner.counters():
            yield CounterMetricFamily(count.name, count.documentation, value=count.value)
        hist = self.owner.event_to_programmed
        bounds = [floatToGoString(b) for b in hist.bounds] + ["+Inf"]
        yield HistogramMetricFamily(hist.name, hist.documentation, buckets=list(zip(bounds, hist.cumulative())),
                                    sum_value=hist.sum)
        yield from self._state_gauges()

    def _state_gauges(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.owner.state
        if state is not None:
            ready = GaugeMetricFamily("flannel_ready", "1 once subnet.env is written and the data plane is programmed")
            ready.add_metric([], 1.0 if state.ready else 0.0)
            yield ready
            if state.lease_expiration is not None:
                exp = GaugeMetricFamily("flannel_lease_expiration_timestamp_seconds",
                                        "Unix time our subnet lease expires in etcd")
                exp.add_metric([], float(state.lease_expiration))
                yield exp
            known = GaugeMetricFamily("flannel_peers_known", "Peer leases seen in etcd (any backend type)")
            known.add_metric([], float(state.leases_seen))
            yield known
            prog = GaugeMetricFamily("flannel_peers_programmed", "Peer leases programmed by the backend")
            prog.add_metric([], float(state.peers_programmed))
            yield prog
            refused = GaugeMetricFamily("flannel_peers_refused", "Peer leases refused by admission now")
            refused.add_metric([], float(len(state.refused)))
            yield refused
            refusals = CounterMetricFamily("flannel_leases_refused", "Lease refusals (once per lease value), "
                                           "by reason", labels=["reason"])
            for code, count in sorted(state.refusals_total.items()):
                refusals.add_metric([code], float(count))
            yield refusals
            if state.backend is not None:  # kernel reconciliation (vxlan, host-gw)
                broken = GaugeMetricFamily("flannel_data_plane_problems",
                                           "Problems the backend sees in its data plane now (0 = healthy)")
                broken.add_metric([], float(len(state.data_plane_problems())))
                yield broken
                repairs = CounterMetricFamily("flannel_kernel_repairs", "Kernel entries the backend repaired",
                                              labels=["what"])
                for what, count in sorted(state.backend.repair_counters().items()):
                    repairs.add_metric([what], float(count))
                yield repairs
        yield from self._backend_counters()

    def _backend_counters(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily

        families = {
            "packets": CounterMetricFamily("flannel_backend_packets", "Packets forwarded by the backend",
                                           labels=["backend", "direction"]),
            "bytes": CounterMetricFamily("flannel_backend_bytes", "Bytes forwarded by the backend",
                                         labels=["backend", "direction"]),
            "drops": CounterMetricFamily("flannel_backend_drops", "Packets the backend dropped",
                                         labels=["backend", "direction", "reason"]),
        }
        paths = {
            "packets": CounterMetricFamily("flannel_backend_path_packets", "Packets forwarded, by the path that "
                                           "carried them (udp: bpf = tc-BPF in the kernel, python = the forwarder)",
                                           labels=["backend", "path", "direction"]),
            "bytes": CounterMetricFamily("flannel_backend_path_bytes", "Bytes forwarded, by the path that carried them",
                                         labels=["backend", "path", "direction"]),
        }
        for backend, read in list(self.owner._counter_sources.items()):
            try:
                values = read()
            except Exception as exc:  # a broken source must not take /metrics down
                log.debug("reading %s counters failed: %s", backend, exc)
                continue
            for key, value in values.items():
                parts = split_counter_name(key)
                if parts is None:
                    continue
                metric, direction, reason = parts
                labels = [backend, direction] + ([reason] if metric == "drops" else [])
                families[metric].add_metric(labels, float(value))
            for metric, path, direction, value in path_split(values):
                paths[metric].add_metric([backend, path, direction], float(value))
        for family in (*families.values(), *paths.values()):
            if family.samples:
                yield family


class Metrics:
    def __init__(self, state: AgentState | None = None) -> None:
        self.state = state
        self._counter_sources: dict[str, Callable[[], Mapping[str, int]]] = {}
        self._registry: CollectorRegistry | None = None
        self.renewals = Count("flannel_lease_renewals", "Successful lease renewals")
        self.renewal_failures = Count("flannel_lease_renewal_failures", "Failed lease renewal attempts")
        self.watch_reconnects = Count("flannel_watch_reconnects", "etcd watch streams re-opened")
        self.watch_resyncs = Count("flannel_watch_resyncs", "Full re-lists of the leases (compaction, lost index)")
        self.event_to_programmed = Buckets("flannel_event_programming_seconds",
                                           "Seconds from a lease event to the backend having programmed it",
                                           _PROGRAM_BUCKETS)

    def counters(self) -> tuple[Count, ...]:
        return (self.renewals, self.renewal_failures, self.watch_reconnects, self.watch_resyncs)

    @property
    def registry(self) -> CollectorRegistry:
        """This agent's own registry, made (and prometheus_client loaded) on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_StateCollector(self))
        return self._registry

    @property
    def content_type(self) -> str:
        """The Content-Type of render()'s text."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST

    def bind_state(self, state: AgentState) -> None:
        """Read lease/peer gauges from this state (serve_health does it when not done already)."""
        self.state = state

    def register_counters(self, backend: str, read: Callable[[], Mapping[str, int]]) -> None:
        """Expose a backend's packet counters; `read()` is called on every scrape."""
        self._counter_sources[backend] = read

    def attach_backend(self, backend: Any) -> None:
        """Register backend.counters() (the udp backend has it) under the backend's name."""
        read = getattr(backend, "counters", None)
        if callable(read):
            self.register_counters(getattr(backend, "name", type(backend).__name__), read)

    def observe_events(self, events: Sequence[Any], seconds: float, backend: Any = None) -> None:
        """One histogram sample per event in a batch the backend applied in `seconds`."""
        if backend is not None and getattr(backend, "name", None) not in self._counter_sources:
            self.attach_backend(backend)
        for _ in events:
            self.event_to_programmed.observe(seconds)

    def renewal(self, ok: bool) -> None:
        (self.renewals if ok else self.renewal_failures).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
