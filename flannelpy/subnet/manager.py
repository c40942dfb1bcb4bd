"""Our subnet lease: acquire it, keep it renewed, and follow the peers' leases.

Acquisition follows flanneld's tryAcquireLease (allocation.plan_acquisition decides, this
module acts).  Where flanneld gives up we do better, deliberately:
- a lost create race is retried with the subnet excluded (up to raceRetries=10) instead of
  exiting 1;
- when our own key is deleted or expires we re-create the same subnet at once instead of
  exiting 0 (which, under Restart=on-failure, left the host without a network);
- but if another host now holds our subnet we fail loudly (exit non-zero).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Awaitable, Callable, Sequence

import trio

from flannelpy.config.network import NetworkConfig
from flannelpy.errors import FlannelError, first_flannel_error
from flannelpy.etcd.store import EXPIRY_NOT_READ, Store, StoreUnavailable, WatchBatch
from flannelpy.hostnet.underlay import Underlay

from .admission import Admission, AdmissionRules, AdmissionStep
from .allocation import plan_acquisition
from .lease import SUBNET_TTL, EventKind, Lease, LeaseAttrs, LeaseData, LeaseEvent, lease_key
from .tracker import LeaseTracker

log = logging.getLogger("flanneld.lease")

RACE_RETRIES = 10  # flanneld's raceRetries
RENEW_RETRY_S = 60.0  # "Error renewing lease (trying again in 1 min)"
_STARTUP_BACKOFF = (0.1, 5.0)
_ACQUIRE_UNAVAILABLE_S = 30.0  # how long acquire() waits out an etcd outage before failing
# A start keeps an unchanged lease as it is only when it has this much beyond the renewal margin.
KEEP_SPARE_S = 600.0
_BACKLOG_BATCHES = 1024  # watch batches read ahead while one is applied (then etcd's stream waits)


class LeaseTaken(FlannelError):
    """Another host now holds the subnet we leased."""


class LeaseManager:
    def __init__(
        self,
        store: Store,
        config: NetworkConfig,
        public_ip: IPv4Address,
        lease_data: LeaseData,
        previous_subnet: IPv4Network | None,
        renew_margin_s: float,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        retry_interval_s: float = RENEW_RETRY_S,
        ttl: int = SUBNET_TTL,
        on_change: Callable[[Lease], None] | None = None,
        on_renewal: Callable[[bool], None] | None = None,
        underlay: Underlay | None = None,
        on_admission: Callable[[AdmissionStep], None] | None = None,
        public_ipv6: IPv6Address | None = None,
        previous_ipv6_subnet: IPv6Network | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.public_ip = IPv4Address(public_ip)
        # Dual stack (EnableIPv6): the host's IPv6 address and what the backend advertises for IPv6.
        self.public_ipv6 = IPv6Address(public_ipv6) if public_ipv6 is not None else None
        if config.enable_ipv6 and self.public_ipv6 is None:
            raise FlannelError("EnableIPv6: no public IPv6 address for this host (-public-ipv6 or the interface's)")
        self.attrs = LeaseAttrs(public_ip=self.public_ip, backend_type=lease_data.backend_type,
                                backend_data=lease_data.backend_data,
                                public_ipv6=self.public_ipv6 if config.enable_ipv6 else None,
                                backend_v6_data=lease_data.backend_v6_data if config.enable_ipv6 else None)
        self.previous_subnet = previous_subnet
        self.previous_ipv6_subnet = previous_ipv6_subnet
        self.renew_margin_s = renew_margin_s
        self.clock = clock  # Unix time, the same scale as Lease.expiration
        self.rng = rng or random.Random()
        self.retry_interval_s = retry_interval_s
        self.ttl = ttl
        self.on_change = on_change
        self.on_resync: Callable[[], None] | None = None  # a full re-list replaced the watch (metrics)
        self.on_renewal = on_renewal  # called with True/False per renewal attempt (metrics)
        # The host's own networks (read at start), which peer leases must not claim (admission).
        self.underlay = underlay or Underlay()
        self.on_admission = on_admission  # every admission step (refusals: metrics, /status)
        self.admission: Admission | None = None
        self.tracker: LeaseTracker | None = None
        self._current: Lease | None = None
        # Set (then replaced) whenever `current` changes: `await mgr.changed.wait()`.
        self.changed = trio.Event()
        self.renewals = 0
        self.recreations = 0
        # watch_peers guards our key from its own watch: keep_lease then opens none of its own,
        # so every event is read, parsed and logged once.
        self._peer_watch_guards = False
        # The listing acquire() planned from, with its revision, until watch_peers takes it: a
        # start lists the leases once, and the watch from that revision brings our own create or
        # renew (and whatever else came since) like any later change.
        self._acquire_listing: tuple[list[Lease], int] | None = None

    # --- state ----------------------------------------------------------------------------

    @property
    def current(self) -> Lease:
        if self._current is None:
            raise RuntimeError("no lease yet: call acquire() first")
        return self._current

    def _set_current(self, lease: Lease) -> None:
        self._current = lease
        event, self.changed = self.changed, trio.Event()
        event.set()
        if self.on_change is not None:
            self.on_change(lease)

    # --- acquire --------------------------------------------------------------------------

    async def acquire(self) -> Lease:
        """Get a subnet in flanneld's order; OutOfSubnets and store errors propagate."""
        deadline = trio.current_time() + _ACQUIRE_UNAVAILABLE_S
        delay = _STARTUP_BACKOFF[0]
        while True:
            try:
                return await self._acquire_once()
            except StoreUnavailable as exc:
                if trio.current_time() >= deadline:
                    raise FlannelError(f"failed to acquire lease: {exc}") from exc
                log.warning("etcd unavailable while acquiring a lease (%s); retrying in %.1fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, _STARTUP_BACKOFF[1])

    def _keep_listing(self, leases: list[Lease], rev: int) -> None:
        # Only before the peer watch runs: a later acquire's listing would be held for nothing.
        self._acquire_listing = (leases, rev) if self.tracker is None else None

    async def _acquire_once(self) -> Lease:
        exclude: list[IPv4Network] = []
        exclude_ipv6: list[IPv6Network] = []
        for _ in range(RACE_RETRIES + 1):
            # Expiries are not read: the plan only asks whether our lease has a TTL at all.
            leases, rev = await self.store.list_leases(expiry=False)
            plan = plan_acquisition(self.config, leases, self.public_ip, self.previous_subnet, self.rng, exclude,
                                    previous_ipv6_subnet=self.previous_ipv6_subnet, exclude_ipv6=exclude_ipv6)
            for old in plan.delete:
                log.info("found lease %s for our IP %s but it does not fit the current config; deleting it",
                         _shown(old), self.public_ip)
                await self.store.delete_lease(old.subnet, old.ipv6_subnet)
            if plan.delete:  # the listing handed to the peer watch must not show them as peers
                leases = [lease for lease in leases if all(lease is not old for old in plan.delete)]
            if plan.reuse is not None:
                lease = await self._kept_as_it_is(plan.reuse)
                if lease is not None:
                    log.info("reusing lease %s of public IP %s (%s; etcd already holds this value, "
                             "nothing written)", _shown(lease), self.public_ip,
                             "a reservation, no TTL" if lease.expiration is None
                             else f"{(lease.expiration - self.clock()) / 3600:.1f} h left")
                else:
                    # A reservation (no TTL) stays one; a lease gets a fresh TTL.
                    ttl = 0 if plan.reuse.expiration is None else self.ttl
                    lease = await self.store.renew_lease(plan.reuse.subnet, self.attrs, ttl, plan.reuse.ipv6_subnet)
                    log.info("reusing lease %s of public IP %s%s", _shown(lease), self.public_ip,
                             " (a reservation, no TTL)" if ttl == 0 else "")
                self._set_current(lease)
                self._keep_listing(leases, rev)
                return lease
            assert plan.create is not None
            lease = await self.store.create_lease(plan.create, self.attrs, self.ttl, plan.create_ipv6)
            if lease is not None:
                self.created_subnet = lease.subnet  # ours to delete if start-up fails (release)
                log.info("allocated lease %s%s", _shown(lease),
                         " (previous subnet from subnet.env)" if plan.create == self.previous_subnet else "")
                self._set_current(lease)
                self._keep_listing(leases, rev)
                return lease
            log.info("subnet %s was taken by another host while we created it; trying another",
                     _shown(Lease(plan.create, self.attrs, ipv6_subnet=plan.create_ipv6)))
            exclude.append(plan.create)
            if plan.create_ipv6 is not None:
                exclude_ipv6.append(plan.create_ipv6)
        raise FlannelError(f"failed to acquire lease: lost {RACE_RETRIES} creation races in a row")

    async def _kept_as_it_is(self, found: Lease) -> Lease | None:
        """Our listed lease, kept without a write, when etcd already holds exactly the value a
        renewal would write and (a reservation aside) its TTL outlasts the renewal margin by
        KEEP_SPARE_S: then the renewal loop renews it in time.  flanneld grants a new etcd lease
        and rewrites the key at every start, which wakes every peer's watch and leaves the old
        etcd lease behind; a restart that changed nothing now costs one read.  None: renew."""
        if found.attrs != self.attrs:
            return None
        if found.expiration is None:
            return found  # a reservation: the renewal would write the same value, no TTL
        left = await self.store.time_left(found)
        if left is None or left < self.renew_margin_s + KEEP_SPARE_S:
            return None
        return Lease(found.subnet, found.attrs, self.clock() + left, found.store_ref, found.ipv6_subnet)

    # --- keep -----------------------------------------------------------------------------

    async def keep_lease(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew before expiry and guard our key; raises LeaseTaken if another host takes it."""
        self.current  # noqa: B018 - fail early without a lease
        try:
            async with trio.open_nursery() as nursery:
                if not self._peer_watch_guards:
                    await nursery.start(self._guard_own_key)
                nursery.start_soon(self._renew_loop)
                task_status.started()
        except BaseExceptionGroup as group:
            # Let the agent see the plain FlannelError (and its exit code), not a group.
            taken = first_flannel_error(group)
            if taken is not None:
                raise taken from group
            raise

    async def _renew_loop(self) -> None:
        while True:
            lease = self.current
            changed = self.changed
            if lease.expiration is None:
                await changed.wait()  # a reservation: nothing to renew
                continue
            delay = lease.expiration - self.renew_margin_s - self.clock()
            with trio.move_on_after(max(delay, 0)):
                await changed.wait()
                continue  # re-created or renewed elsewhere: recompute the deadline
            await self._renew_now(lease)

    async def _renew_now(self, lease: Lease) -> None:
        while True:
            try:
                renewed = await self.store.renew_lease(lease.subnet, self.attrs, self.ttl, lease.ipv6_subnet)
            except (StoreUnavailable, FlannelError) as exc:
                log.error("Error renewing lease (trying again in %s): %s", _human(self.retry_interval_s), exc)
                if self.on_renewal is not None:
                    self.on_renewal(False)
                await trio.sleep(self.retry_interval_s)
                continue
            self.renewals += 1
            if self.on_renewal is not None:
                self.on_renewal(True)
            log.info("lease %s renewed, new expiration %s", _shown(renewed),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(renewed.expiration or 0)))
            self._set_current(renewed)
            # Never hot-loop when the margin is at least the TTL.
            if renewed.expiration is not None and renewed.expiration - self.renew_margin_s - self.clock() < 1:
                await trio.sleep(1)
            return

    async def _guard_own_key(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        leases, rev = await _retry_unavailable(functools.partial(self.store.list_leases, expiry=False))
        await self._check_listing(leases)
        task_status.started()
        async for batch in self.store.watch_leases(rev, expiry=False):
            await self._check_batch(batch)

    async def _check_listing(self, leases: Sequence[Lease]) -> None:
        key = self.current.key  # both halves of a dual-stack key: the plain IPv4 key is another lease
        mine = next((lease for lease in leases if lease.key == key), None)
        await self._own_state(mine)

    async def _check_batch(self, batch: WatchBatch) -> None:
        if batch.snapshot is not None:
            await self._check_listing(batch.snapshot)
            return
        key = self.current.key
        for event in batch.events:
            if event.lease.key != key:
                continue
            await self._own_state(event.lease if event.kind is EventKind.ADDED else None)

    async def _own_state(self, lease: Lease | None) -> None:
        """React to what etcd now holds at our key (None: nothing)."""
        if lease is None:
            await self._recreate()
        elif lease.attrs.public_ip != self.public_ip:
            raise LeaseTaken(f"lease for {lease.subnet} was taken by {lease.attrs.public_ip}")
        elif lease.store_ref != self.current.store_ref:
            # Renewed by someone with our IP (or our own put seen late): adopt its expiry, read
            # now if the listing or watch did not (one TimeToLive call, for our key only).
            if lease.expiration == EXPIRY_NOT_READ:
                # retried: an etcd restart here must not end the peer watch this runs on (and the agent)
                fresh = await _retry_unavailable(functools.partial(self.store.get_lease, lease.subnet,
                                                                   lease.ipv6_subnet))
                if fresh is None:
                    await self._recreate()  # gone again already
                    return
                lease = fresh
                if lease.attrs.public_ip != self.public_ip:
                    raise LeaseTaken(f"lease for {lease.subnet} was taken by {lease.attrs.public_ip}")
            self._set_current(Lease(lease.subnet, self.attrs, lease.expiration, lease.store_ref,
                                    ipv6_subnet=lease.ipv6_subnet))

    async def _recreate(self) -> None:
        subnet, ipv6_subnet = self.current.subnet, self.current.ipv6_subnet
        log.error("Lease has been revoked: the key for our subnet %s is gone (deleted or expired); "
                  "re-creating the same subnet (flanneld would exit here)", _shown(self.current))
        while True:
            try:
                lease = await self.store.create_lease(subnet, self.attrs, self.ttl, ipv6_subnet)
                if lease is None:
                    leases, _ = await self.store.list_leases()
                    holder = next((x for x in leases if x.key == lease_key(subnet, ipv6_subnet)), None)
                    if holder is None:
                        continue  # gone again already: try once more
                    if holder.attrs.public_ip != self.public_ip:
                        raise LeaseTaken(f"lease for {subnet} was taken by {holder.attrs.public_ip}")
                    lease = holder
            except StoreUnavailable as exc:
                log.warning("re-creating lease %s: %s; retrying", subnet, exc)
                await trio.sleep(min(1.0, self.retry_interval_s))
                continue
            self.recreations += 1
            log.warning("re-created lease %s", _shown(lease))
            self._set_current(lease)
            return

    # --- peers ----------------------------------------------------------------------------

    async def watch_peers(
        self,
        apply: Callable[[list[LeaseEvent]], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Apply every peer lease now (started() after that), then every change, forever.

        Only admitted leases reach `apply` (subnet/admission.py); refusals are logged here.
        The same watch guards our own key (keep_lease then opens no watch of its own); peers'
        expiries are never read (no TimeToLive call per lease, as flanneld makes)."""
        tracker = LeaseTracker(self.current.subnet)
        self.tracker = tracker
        admission = Admission(self.admission_rules())
        self.admission = admission
        self._peer_watch_guards = True
        rev = await self._apply_listing(tracker, admission, apply)
        task_status.started()
        # The watch is read on while a batch is applied; what piled up meanwhile is applied at
        # once by its net effect (tracker.update_many), so a backlog never replays history.
        send, recv = trio.open_memory_channel[WatchBatch](_BACKLOG_BATCHES)

        async def read_watch() -> None:
            async with send:
                async for batch in self.store.watch_leases(rev, expiry=False):
                    await send.send(batch)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_watch)
                async for first in recv:
                    batches = [first]
                    while len(batches) < _BACKLOG_BATCHES:
                        try:
                            batches.append(recv.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    for batch in batches:
                        if batch.snapshot is not None and self.on_resync is not None:
                            self.on_resync()
                        await self._check_batch(batch)
                    events = self._admit(admission, tracker.update_many(batches))
                    if events:
                        await apply(events)
        except BaseExceptionGroup as group:
            # The agent (and its exit code) wants the plain error, not a group.
            taken = first_flannel_error(group)
            if taken is not None:
                raise taken from group
            raise

    async def _apply_listing(self, tracker: LeaseTracker, admission: Admission,
                             apply: Callable[[list[LeaseEvent]], Awaitable[None]]) -> int:
        """The peer watch's first step: every listed peer applied; returns the listing's revision.
        Its own frame, so the listing and its events are not held for as long as the watch runs."""
        handed, self._acquire_listing = self._acquire_listing, None
        if handed is not None:
            # Our key is not checked in it: acquire() planned from this very listing (its key of
            # ours is the one it kept or wrote over), and the watch brings any change after it.
            leases, rev = handed
        else:
            leases, rev = await _retry_unavailable(functools.partial(self.store.list_leases, expiry=False))
            await self._check_listing(leases)
        events = self._admit(admission, tracker.reset(leases))
        if events:
            await apply(events)
        return rev

    def accepted_count(self) -> int:
        """How many peer leases admission accepts now (0 before watch_peers starts)."""
        return len(self.admission.accepted) if self.admission is not None else 0

    def admission_rules(self) -> AdmissionRules:
        """What peer leases are judged against: the Network, our own lease, this host's networks."""
        return AdmissionRules(
            network=self.config.network,
            own_subnet=self.current.subnet,
            own_public_ip=self.public_ip,
            own_vtep_mac=self.attrs.vtep_mac,
            underlay=self.underlay,
            # host-gw routes go straight to the peer's PublicIP: only a peer on our link can be one.
            onlink_backend="host-gw" if self.config.backend_type == "host-gw" else None,
            ipv6_network=self.config.ipv6_network if self.config.enable_ipv6 else None,
            own_ipv6_subnet=self.current.ipv6_subnet,
            own_public_ipv6=self.attrs.public_ipv6,
            own_vtep_mac_v6=self.attrs.vtep_mac_v6,
        )

    def _admit(self, admission: Admission, events: list[LeaseEvent]) -> list[LeaseEvent]:
        if not events:
            return []
        step = admission.apply(events)
        for refusal in step.refused:  # once per lease value: a re-put of the same value is quiet
            log.warning("refusing lease %s (PublicIP %s): %s", refusal.subnet, refusal.lease.attrs.public_ip,
                        refusal.reason)
        for lease in step.readmitted:
            log.info("accepting lease %s (PublicIP %s), refused until now: what it conflicted with is gone",
                     lease.subnet, lease.attrs.public_ip)
        if self.on_admission is not None and (step.refused or step.cleared):
            self.on_admission(step)
        return step.events

    # --- undo -----------------------------------------------------------------------------

    created_subnet: IPv4Network | None = None  # the key acquire() created (not one it reused)

    async def release(self) -> bool:
        """Start-up failed after acquire(): delete our key if this run created it, so a refused
        start leaves etcd as it found it.  A lease reused from a previous run stays (it may be
        what this host's containers use).  True when a key was deleted."""
        if self._current is None or self.created_subnet != self._current.subnet:
            return False
        await self.store.delete_lease(self.created_subnet, self._current.ipv6_subnet)
        log.info("deleted lease %s, created by this run, as start-up failed", _shown(self._current))
        return True


async def _retry_unavailable(fn):
    delay = _STARTUP_BACKOFF[0]
    while True:
        try:
            return await fn()
        except StoreUnavailable as exc:
            log.warning("etcd unavailable (%s); retrying in %.1fs", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, _STARTUP_BACKOFF[1])


def _shown(lease: Lease) -> str:
    """A lease in a log line: its subnet, and with dual stack its IPv6 subnet (`10.5.7.0/24 fd42:0:0:7::/64`)."""
    return str(lease.subnet) if lease.ipv6_subnet is None else f"{lease.subnet} {lease.ipv6_subnet}"


def _human(seconds: float) -> str:
    return "1 min" if seconds == 60 else f"{seconds:g}s"
