"""The GPU quota as a Prefect global concurrency limit, shared by every sweep that names it.

The limit is the organisation's: the first sweep creates it from its --quota, later sweeps never
change it (each runs at most min(its --quota, the limit) GPUs' worth of trials), and
`hpsweep quota` shows and sets it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from hpsweep.engine.stopping import SlotWaitAbandoned
from hpsweep.inputs import Problem, SweepInputError
from hpsweep.periodic import Periodic

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

log = logging.getLogger("hpsweep")

# A dead sweep's slots come back after this long (Prefect renews the lease while the sweep lives).
SLOT_LEASE_S = 60.0  # the shortest lease Prefect accepts
SLOT_WAIT_STEP_S = 2.0  # a worker waiting for a slot looks this often whether the sweep is stopping


def _not_a_slot_wait_step(record: logging.LogRecord) -> bool:
    """Prefect logs each timed-out slot request as an ERROR; here a timeout is only a wait step."""
    message = record.getMessage()
    return not ("ConcurrencySlotAcquisition" in message and "TimeoutError" in message)


logging.getLogger("prefect._internal.concurrency").addFilter(_not_a_slot_wait_step)
SWEEP_FLOW_NAME = "sweep"  # the flow whose runs hold the slots (flows/sweep.py)


@dataclass(frozen=True)
class QuotaLimit:
    """A Prefect global concurrency limit as hpsweep sees it. An inactive limit is not enforced
    by Prefect (its slots are never counted)."""

    name: str
    limit: int
    active_slots: int
    active: bool = True
    id: UUID | None = None

    def usable(self, quota: int) -> int:
        """GPUs a sweep with ``quota`` may use at once: min(quota, limit); an inactive limit caps nothing."""
        return min(quota, self.limit) if self.active else quota


def _as_limit(response: Any) -> QuotaLimit:
    return QuotaLimit(response.name, response.limit, response.active_slots, bool(response.active), response.id)


def _read_or_create(client: SyncPrefectClient, name: str, size: int) -> tuple[QuotaLimit, bool]:
    """The limit, created with ``size`` slots when absent; whether this call created it. Two sweeps
    starting together may both find it absent: the one that loses the race reads the winner's."""
    try:
        return _as_limit(client.read_global_concurrency_limit_by_name(name)), False
    except ObjectNotFound:
        pass
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
        created = True
    except ObjectAlreadyExists:
        created = False
    return _as_limit(client.read_global_concurrency_limit_by_name(name)), created


def _at_once(gpus: int, gpus_per_trial: int) -> str:
    if gpus_per_trial == 1:
        return f"at most {gpus} trials at once"
    return f"at most {gpus} GPUs at once ({gpus // gpus_per_trial} trials of {gpus_per_trial} GPUs)"


def ensure_quota_limit(name: str, quota: int, gpus_per_trial: int = 1) -> QuotaLimit:
    """The shared limit, created with ``quota`` slots when absent and otherwise left as it is.

    A sweep whose ``quota`` differs from the limit says so (at INFO: call this once per sweep) and
    may use ``QuotaLimit.usable(quota)`` GPUs at once. An inactive limit is left inactive (someone
    switched it off; `hpsweep quota N` switches it on) with a warning: Prefect then limits nothing
    and sweeps sharing it are not held together. Raises SweepInputError when the (active) limit is
    smaller than one trial's GPUs: Prefect would refuse every slot.
    """
    with get_client(sync_client=True) as client:
        limit, created = _read_or_create(client, name, quota)
    if created:
        log.info("created Prefect concurrency limit %r with %d slots (this sweep's --quota); `hpsweep quota` "
                 "shows and changes it", name, limit.limit)
    if not limit.active:
        log.warning("quota limit %r is inactive: Prefect does not enforce it, so sweeps sharing it are not "
                    "limited together; this sweep's --quota %d: %s (`hpsweep quota N` activates it)",
                    name, quota, _at_once(quota, gpus_per_trial))
    elif limit.limit < gpus_per_trial:
        raise SweepInputError([Problem("--quota-limit", f"quota limit {name!r} is {limit.limit} but a trial needs "
                                       f"{gpus_per_trial} GPUs: raise it with `hpsweep quota {gpus_per_trial}`")])
    elif limit.limit != quota:  # the organisation's limit, set once: an ordinary run, not a problem
        log.info("quota limit %r is %d; this sweep's --quota %d: %s", name, limit.limit, quota,
                    _at_once(limit.usable(quota), gpus_per_trial))
    return limit


@contextmanager
def hold_slot(name: str, gpus: int, flow_run_id: UUID | str | None = None,
              stopping: threading.Event | None = None) -> Iterator[None]:
    """Hold ``gpus`` slots of the limit (waiting for them), under a lease that names the sweep's
    flow run so that `hpsweep quota` can say which sweep holds them. While waiting, a set
    ``stopping`` event gives up the wait (SlotWaitAbandoned) within SLOT_WAIT_STEP_S."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id) if flow_run_id else None
    with ExitStack() as held:
        while True:
            if stopping is not None and stopping.is_set():
                raise SlotWaitAbandoned(name)
            try:
                held.enter_context(concurrency(name, occupy=gpus, strict=True, lease_duration=SLOT_LEASE_S,
                                               holder=holder, timeout_seconds=SLOT_WAIT_STEP_S if stopping else None))
                break
            except TimeoutError:
                continue  # still waiting for a slot: look at ``stopping`` again
        yield


# ------------------------------------------------ `hpsweep quota`: show and set the limit


class QuotaInUse(Exception):
    """Lowering the limit below the slots in use was refused (without --force)."""


@dataclass(frozen=True)
class SlotHolder:
    """The slots one sweep (one flow run) holds, or those held by leases that name no holder."""

    slots: int
    leases: int
    flow_run_id: UUID | None
    label: str  # e.g. "sweep 'digits' (flow run 'clever-fox', Running)"


@dataclass(frozen=True)
class QuotaView:
    """What `hpsweep quota` shows."""

    name: str
    limit: QuotaLimit | None  # None: no sweep has created it yet
    where: str  # which Prefect holds it
    holders: tuple[SlotHolder, ...] | None  # None: this Prefect does not tell who holds slots
    running_sweeps: tuple[str, ...]  # when holders are unknown: the sweep flow runs running now
    returned: int = 0  # expired leases (sweeps that died) whose slots were returned just now


def embedded_default() -> bool:
    """No Prefect API configured by the user: hpsweep's local server (hpsweep.engine.localserver)
    on PREFECT_HOME's database, or no server yet."""
    from hpsweep.engine.localserver import configured_prefect_api

    return configured_prefect_api() is None


def where_the_limit_lives() -> str:
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not embedded_default():
        return f"the Prefect server at {settings.api.url}"
    through = f"hpsweep's local Prefect server at {settings.api.url}" if settings.api.url else "a Prefect server"
    return (f"Prefect's local database in PREFECT_HOME ({settings.home}), through {through} "
            "(as `hpsweep run` without PREFECT_API_URL)")


@contextmanager
def _prefect_client() -> Iterator[SyncPrefectClient]:
    """Prefect's client (`hpsweep quota` points it at the local server first); without any API
    URL Prefect starts a temporary server, here with a two-minute start-up budget on a busy
    machine and, unless told otherwise, no telemetry."""
    from prefect.settings import (PREFECT_SERVER_ANALYTICS_ENABLED, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  temporary_settings)

    defaults = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    updates = {setting: value for setting, value in defaults.items() if setting.name not in os.environ}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


def _leases_readable() -> bool:
    """The embedded default keeps its leases in files under PREFECT_HOME (dead_sweeps_slots_returned);
    a Prefect server keeps them in its own memory (or Redis), which its API does not list."""
    return embedded_default() and os.environ.get(LEASE_STORAGE_ENV, FILESYSTEM_LEASES) == FILESYSTEM_LEASES


def _leases_of(limit_id: UUID) -> list[tuple[int, UUID | None]]:
    """(slots, holder flow run id) of every live lease on the limit, from the lease files."""
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
    from prefect.utilities.asyncutils import run_coro_as_sync

    storage = ConcurrencyLeaseStorage()

    async def read() -> list[tuple[int, UUID | None]]:
        now, found, offset = datetime.now(timezone.utc), [], 0
        while batch := await storage.read_active_lease_ids(limit=100, offset=offset):
            for lease_id in batch:
                lease = await storage.read_lease(lease_id)
                if lease is None or limit_id not in lease.resource_ids or lease.expiration <= now:
                    continue
                holder = lease.metadata.holder if lease.metadata else None
                found.append((lease.metadata.slots if lease.metadata else 0,
                              holder.id if holder is not None and holder.type == "flow_run" else None))
            offset += len(batch)
        return found

    return run_coro_as_sync(read()) or []


def _sweep_label(run: FlowRun) -> str:
    config = run.parameters.get("config") if isinstance(run.parameters, dict) else None
    config = config if isinstance(config, dict) else {}
    if config.get("name"):
        sweep = f"sweep {config['name']!r}"
    elif config.get("spec"):
        sweep = f"sweep of spec {Path(str(config['spec'])).as_posix()}"
    else:
        sweep = "a sweep"
    state = run.state.name if run.state is not None else "no state"
    return f"{sweep} (flow run {run.name!r}, {state})"


def _holders(client: SyncPrefectClient, limit_id: UUID) -> tuple[SlotHolder, ...]:
    slots: dict[UUID | None, list[int]] = defaultdict(list)
    for n, flow_run_id in _leases_of(limit_id):
        slots[flow_run_id].append(n)
    holders = []
    for flow_run_id, held in slots.items():
        if flow_run_id is None:
            label = "unnamed holder (a lease that names no flow run)"
        else:
            try:
                label = _sweep_label(client.read_flow_run(flow_run_id))
            except ObjectNotFound:
                label = f"flow run {flow_run_id} (no longer in Prefect)"
        holders.append(SlotHolder(sum(held), len(held), flow_run_id, label))
    return tuple(sorted(holders, key=lambda h: (-h.slots, h.label)))


def _running_sweeps(client: SyncPrefectClient) -> tuple[str, ...]:
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": [SWEEP_FLOW_NAME]}),
                                 flow_run_filter=FlowRunFilter(state={"type": {"any_": [StateType.RUNNING]}}),
                                 limit=200)
    return tuple(sorted(_sweep_label(run) for run in runs))


def _returned_expired() -> int:
    """On the embedded default, first give back the slots of sweeps that died (their leases expired),
    as a running sweep or a Prefect server would: the slots in use are then the living sweeps'."""
    return reclaim_expired_slots() if _leases_readable() else 0


def show_quota(name: str) -> QuotaView:
    """The limit, its slots in use and who holds them (as far as this Prefect can tell)."""
    with _prefect_client() as client:
        returned = _returned_expired()
        try:
            limit = _as_limit(client.read_global_concurrency_limit_by_name(name))
        except ObjectNotFound:
            return QuotaView(name, None, where_the_limit_lives(), None, (), returned)
        if _leases_readable() and limit.id is not None:
            return QuotaView(name, limit, where_the_limit_lives(), _holders(client, limit.id), (), returned)
        return QuotaView(name, limit, where_the_limit_lives(), None, _running_sweeps(client), returned)


def set_quota(name: str, size: int, force: bool = False) -> tuple[QuotaLimit | None, QuotaLimit]:
    """Set the limit to ``size`` slots and make it active (creating it when absent); the limit
    before (None if absent) and after. Raises QuotaInUse when ``size`` is below the slots in use
    and not ``force``: running trials keep their slots either way, but lowering it under them is
    a decision to take knowingly (no new trial starts until fewer than ``size`` are in use)."""
    if size < 1:
        raise ValueError(f"a quota limit needs at least 1 slot, got {size}")
    with _prefect_client() as client:
        _returned_expired()
        before, created = _read_or_create(client, name, size)
        if created:
            return None, before
        if size < before.active_slots and not force:
            raise QuotaInUse(f"quota limit {name!r} has {before.active_slots} slots in use: lowering it to {size} "
                             f"would leave more trials running than it allows; pass --force to lower it anyway "
                             f"(running trials keep their slots, no new one starts until fewer than {size} are "
                             "in use)")
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=size, active=True))
        return before, _as_limit(client.read_global_concurrency_limit_by_name(name))


def render_quota(view: QuotaView) -> str:
    """`hpsweep quota`'s text."""
    if view.limit is None:
        return (f"no quota limit {view.name!r} yet in {view.where}: the first sweep creates it from its --quota, "
                f"or create it now with `hpsweep quota N`")
    limit = view.limit
    free = max(0, limit.limit - limit.active_slots)
    lines = [f"quota limit {limit.name!r}: {limit.limit} slots, {limit.active_slots} in use, {free} free"
             + ("" if limit.active else " (inactive: Prefect does not enforce it; `hpsweep quota N` activates it)")]
    if view.returned:
        lines.append(f"  returned the slots of {view.returned} expired lease(s) first: sweeps that died")
    if view.holders is not None:
        lines.append("  held by:" if view.holders else "  held by: nobody")
        lines += [f"    {h.slots} slot(s)  {h.label}" + (f", {h.leases} leases" if h.leases > 1 else "")
                  for h in view.holders]
    else:
        lines.append("  held by: not known (Prefect's API does not list who holds a global concurrency limit's "
                     "slots); sweeps running now:" + ("" if view.running_sweeps else " none"))
        lines += [f"    {label}" for label in view.running_sweeps]
    lines.append(f"  in {view.where}")
    return "\n".join(lines)


# ------------------------------------------------ the embedded default: slots of sweeps that died

LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
REPOSSESS_EVERY_S = 15.0  # as Prefect's own Repossessor service
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"


@contextmanager
def dead_sweeps_slots_returned(local_launcher: bool) -> Iterator[None]:
    """While a sweep runs on the embedded default (no Prefect API configured by the user): leases
    on disk, and expired leases' slots returned. The local server keeps its leases in the same
    files (hpsweep.engine.localserver), so they outlive it, and leaves returning them to this."""
    if not local_launcher or not embedded_default():
        yield  # a real Prefect server runs its own Repossessor
        return
    os.environ.setdefault(LEASE_STORAGE_ENV, FILESYSTEM_LEASES)
    repossessor = SlotRepossessor()
    try:
        yield
    finally:
        repossessor.stop()


async def revoke_with_prefect_server_api(lease_id: UUID, storage: ConcurrencyLeaseStorage) -> None:
    """Return one expired lease's slots with Prefect's *server-side* API.

    ``prefect.server.services.repossessor.revoke_expired_lease`` is the body of Prefect's
    Repossessor service, not part of its client API: an upgrade may move, rename or re-sign
    it. tests/test_quota.py checks its import and signature so that such an upgrade fails there.
    """
    from prefect.server.database import provide_database_interface
    from prefect.server.services.repossessor import revoke_expired_lease

    await revoke_expired_lease(lease_id, db=provide_database_interface(), lease_storage=storage)


def reclaim_expired_slots() -> int:
    """Give back the slots of every expired lease (a holder that stopped renewing: it died); how many.

    Prefect's Repossessor service does this in a real server; here the sweep's process does it
    with the same functions on the same database (PREFECT_HOME) and the same lease files.
    """
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
    from prefect.utilities.asyncutils import run_coro_as_sync

    storage = ConcurrencyLeaseStorage()

    async def reclaim() -> int:
        expired = await storage.read_expired_lease_ids()
        for lease_id in expired:
            await revoke_with_prefect_server_api(lease_id, storage)
        return len(expired)

    return run_coro_as_sync(reclaim()) or 0


class SlotRepossessor:
    """Prefect's Repossessor service for the embedded default, which does not run it: checks at
    once, then every ``interval_s``, for expired leases and returns their slots.

    A sweep holds its quota slots under leases it renews; a sweep killed with -9 stops renewing
    and its leases expire. Without this, a rerun after such a crash would wait for the dead
    sweep's slots forever; with it, at most a lease (SLOT_LEASE_S) and one interval.
    """

    def __init__(self, interval_s: float = REPOSSESS_EVERY_S):
        self._loop = Periodic(interval_s, self._check, "hpsweep-slot-repossessor", first=True).start()

    @staticmethod
    def _check() -> None:
        # An exception (e.g. Prefect's database not created yet on a fresh machine) is logged
        # at debug level by Periodic, and the next interval tries again.
        returned = reclaim_expired_slots()
        if returned:
            log.warning("returned the quota slots of %d expired lease(s): a sweep holding them died", returned)

    def stop(self, timeout_s: float = 30) -> bool:
        """Stop checking; False when a check was still running after ``timeout_s``."""
        return self._loop.stop(timeout_s)
