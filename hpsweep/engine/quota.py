"""The GPU quota as a Prefect global concurrency limit, shared by every sweep that names it."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

log = logging.getLogger("hpsweep")


def ensure_quota_limit(name: str, quota: int) -> int:
    """Create the limit, or set it to ``quota`` if it holds another value; how many of its slots
    are taken now (by other sweeps, or by sweeps that died).

    The limit is the organisation's: two sweeps naming it share its slots. The last
    sweep started sets its size, and that is logged, never silent.
    """
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=quota))
            return 0
        if limit.limit != quota or not limit.active:
            log.warning("setting Prefect concurrency limit %r from %s to the quota %s", name, limit.limit, quota)
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=quota, active=True))
        return limit.active_slots


# ------------------------------------------------ the embedded default: slots of sweeps that died

LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
REPOSSESS_EVERY_S = 15.0  # as Prefect's own Repossessor service
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"


@contextmanager
def dead_sweeps_slots_returned(local_launcher: bool) -> Iterator[None]:
    """While a sweep runs on the embedded default (no Prefect API configured: Prefect starts its
    temporary server for the sweep), keep leases on disk and return expired leases' slots."""
    from prefect.settings import get_current_settings

    if not local_launcher or get_current_settings().api.url:
        yield  # a real Prefect server runs its own Repossessor
        return
    # Before the temporary server starts (it inherits the environment): its default lease
    # storage is its own memory, so the leases of a sweep that died vanished with its server.
    os.environ.setdefault(LEASE_STORAGE_ENV, FILESYSTEM_LEASES)
    repossessor = SlotRepossessor()
    try:
        yield
    finally:
        repossessor.stop()


def reclaim_expired_slots() -> int:
    """Give back the slots of every expired lease (a holder that stopped renewing: it died); how many.

    This is the work of Prefect's Repossessor service, done from the sweep's process with Prefect's
    own server functions on the same database (PREFECT_HOME) and the same lease files.
    """
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
    from prefect.server.database import provide_database_interface
    from prefect.server.services.repossessor import revoke_expired_lease
    from prefect.utilities.asyncutils import run_coro_as_sync

    storage = ConcurrencyLeaseStorage()

    async def reclaim() -> int:
        expired = await storage.read_expired_lease_ids()
        for lease_id in expired:
            await revoke_expired_lease(lease_id, db=provide_database_interface(), lease_storage=storage)
        return len(expired)

    return run_coro_as_sync(reclaim()) or 0


class SlotRepossessor:
    """The embedded default's stand-in for Prefect's Repossessor service, while a sweep runs.

    A sweep holds its quota slots under leases it renews; a sweep killed with -9 stops renewing
    and its leases expire. Prefect returns expired leases' slots in a server service that its
    temporary server (the embedded default) does not run, so the killed sweep's slots stayed
    taken and the rerun waited for them forever. With the leases on disk (dead_sweeps_slots_returned),
    this thread returns them every ``interval_s``: a rerun right after a crash waits at most a
    lease (flows.sweep.SLOT_LEASE_S) and one interval.
    """

    def __init__(self, interval_s: float = REPOSSESS_EVERY_S):
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hpsweep-slot-repossessor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                returned = reclaim_expired_slots()
                if returned:
                    log.warning("returned the quota slots of %d expired lease(s): a sweep holding them died", returned)
            except Exception as e:  # e.g. Prefect's database not created yet on a fresh machine
                log.debug("could not check for expired quota leases: %s: %s", type(e).__name__, e)
            if self._stop.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
