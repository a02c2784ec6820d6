"""hpsweep.engine.quota without a server: the repossessor's loop, when it runs at all, and the
Prefect server-side function it depends on."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import uuid

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from hpsweep.engine import quota
from tests.test_identity_periodic import Calls


def test_prefects_server_side_revoke_expired_lease_is_still_there():
    """quota.revoke_with_prefect_server_api calls a function of Prefect's *server*, not of its client
    API. If this fails after a Prefect upgrade, find where the Repossessor service now revokes a
    lease and follow it there (quota.py is the only caller)."""
    from prefect.server.services.repossessor import revoke_expired_lease

    assert inspect.iscoroutinefunction(revoke_expired_lease)
    params = inspect.signature(revoke_expired_lease).parameters
    first = next(iter(params.values()))
    assert first.name == "lease_id" and first.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for name in ("db", "lease_storage"):
        assert name in params and params[name].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                        inspect.Parameter.POSITIONAL_OR_KEYWORD)
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
    from prefect.server.database import provide_database_interface

    assert callable(provide_database_interface)
    assert inspect.iscoroutinefunction(ConcurrencyLeaseStorage.read_expired_lease_ids)


def test_revoking_a_lease_that_is_gone_goes_through_prefects_function():
    """The wrapper's call matches Prefect's function: a lease whose record is gone is revoked in the
    storage (Prefect's branch that touches no database)."""

    class GoneLease:
        def __init__(self):
            self.revoked: list[uuid.UUID] = []

        async def read_lease(self, lease_id):
            return None

        async def revoke_lease(self, lease_id):
            self.revoked.append(lease_id)

    storage, lease = GoneLease(), uuid.uuid4()
    asyncio.run(quota.revoke_with_prefect_server_api(lease, storage))
    assert storage.revoked == [lease]


def test_repossessor_checks_at_once_then_stop_ends_it(monkeypatch):
    reclaim = Calls()
    monkeypatch.setattr(quota, "reclaim_expired_slots", reclaim)
    repossessor = quota.SlotRepossessor(interval_s=3600)  # only the first check can happen in this test
    assert reclaim.wait_for(1)
    assert repossessor.stop(timeout_s=30) is True  # the loop ended without waiting out its interval
    assert reclaim.count == 1


def test_repossessor_keeps_checking_after_a_failure_and_stops_for_good(monkeypatch):
    reclaim = Calls(fail_first=2)
    monkeypatch.setattr(quota, "reclaim_expired_slots", reclaim)
    repossessor = quota.SlotRepossessor(interval_s=0.01)
    assert reclaim.wait_for(5)  # two failed checks did not end the loop
    assert repossessor.stop(timeout_s=30) is True
    calls = reclaim.count
    threading.Event().wait(0.1)  # ten more intervals
    assert reclaim.count == calls


def test_returned_slots_are_logged_as_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(quota, "reclaim_expired_slots", Calls(returns=2))
    with caplog.at_level(logging.WARNING, logger="hpsweep"):
        quota.SlotRepossessor._check()
    assert "returned the quota slots of 2 expired lease(s)" in caplog.text


class RecordingRepossessor:
    started: list["RecordingRepossessor"] = []

    def __init__(self):
        self.stopped = False
        RecordingRepossessor.started.append(self)

    def stop(self) -> bool:
        self.stopped = True
        return True


@pytest.fixture
def recorded(monkeypatch) -> list[RecordingRepossessor]:
    RecordingRepossessor.started = []
    monkeypatch.setattr(quota, "SlotRepossessor", RecordingRepossessor)
    monkeypatch.setenv(quota.LEASE_STORAGE_ENV, "")  # so that teardown restores the variable as it was
    monkeypatch.delenv(quota.LEASE_STORAGE_ENV)
    return RecordingRepossessor.started


def test_embedded_default_runs_a_repossessor_with_leases_on_disk(recorded):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with quota.dead_sweeps_slots_returned(local_launcher=True):
            assert len(recorded) == 1 and not recorded[0].stopped
            assert os.environ[quota.LEASE_STORAGE_ENV] == quota.FILESYSTEM_LEASES
        assert recorded[0].stopped


def test_a_configured_prefect_server_repossesses_its_own_slots(recorded):
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        with quota.dead_sweeps_slots_returned(local_launcher=True):
            pass
    assert recorded == [] and quota.LEASE_STORAGE_ENV not in os.environ


def test_pool_launcher_needs_no_repossessor(recorded):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with quota.dead_sweeps_slots_returned(local_launcher=False):
            pass
    assert recorded == [] and quota.LEASE_STORAGE_ENV not in os.environ


def test_the_repossessor_stops_when_the_sweep_fails(recorded):
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(KeyboardInterrupt):
        with quota.dead_sweeps_slots_returned(local_launcher=True):
            raise KeyboardInterrupt
    assert recorded[0].stopped
