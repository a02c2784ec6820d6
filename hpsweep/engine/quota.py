"""The GPU quota as a Prefect global concurrency limit, shared by every sweep that names it."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

from hpsweep.periodic import Periodic

if TYPE_CHECKING:
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

log = logging.getLogger("hpsweep")

# A dead sweep's slots come back after this long (Prefect renews the lease while the sweep lives).
SLOT_LEASE_S = 60.0  # the shortest lease Prefect accepts


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
    # storage is its own memory, so the leases of a sweep that died would vanish with its server.
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
