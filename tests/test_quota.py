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
from hpsweep.inputs import SweepInputError
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


def test_the_local_server_a_sweep_adopted_is_still_the_embedded_default(recorded, monkeypatch):
    """hpsweep's local Prefect server keeps its leases in files and leaves returning them to the sweeps."""
    from hpsweep.engine.localserver import ADOPTED_ENV

    monkeypatch.setenv(ADOPTED_ENV, "http://127.0.0.1:4321/api")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4321/api"}):
        assert quota.embedded_default()
        with quota.dead_sweeps_slots_returned(local_launcher=True):
            assert len(recorded) == 1 and os.environ[quota.LEASE_STORAGE_ENV] == quota.FILESYSTEM_LEASES
        assert "hpsweep's local Prefect server at http://127.0.0.1:4321/api" in quota.where_the_limit_lives()
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        assert not quota.embedded_default()  # an API the user configured


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


# ------------------------------------------------ the shared limit, on a real Prefect API


@pytest.fixture(scope="module")
def embedded_prefect(tmp_path_factory):
    """The embedded default as `hpsweep run` has it (no PREFECT_API_URL, leases in files under
    PREFECT_HOME), with the temporary server started once for the module: Prefect's test harness
    registers its server as the one a client without an API URL starts."""
    from prefect.settings import (PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                                  PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home-quota")
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                     PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE: quota.FILESYSTEM_LEASES,
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}), \
            prefect_test_harness(server_startup_timeout=None):
        api_url = PREFECT_API_URL.value()  # the same server, for tests of a configured Prefect API
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield api_url


def limit_name() -> str:
    return f"test-gpus-{uuid.uuid4().hex[:8]}"


def read_limit(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def running_sweep(name: str):
    """A RUNNING flow run of a flow named like hpsweep's, as a sweep started with --name ``name`` has."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name=quota.SWEEP_FLOW_NAME)
    def sweep(config: dict) -> None:
        pass

    with get_client(sync_client=True) as client:
        return client.create_flow_run(sweep, parameters={"config": {"name": name, "spec": "params/spec.yaml"}},
                                      state=Running())


def test_the_first_sweep_creates_the_limit_from_its_quota(embedded_prefect, caplog):
    name = limit_name()
    with caplog.at_level(logging.INFO, logger="hpsweep"):
        limit = quota.ensure_quota_limit(name, 3)
    assert (limit.name, limit.limit, limit.active_slots, limit.active) == (name, 3, 0, True)
    assert read_limit(name).limit == 3
    assert f"created Prefect concurrency limit {name!r} with 3 slots" in caplog.text
    assert "WARNING" not in caplog.text


def test_sweeps_with_other_quotas_never_change_the_limit(embedded_prefect, caplog):
    name = limit_name()
    quota.ensure_quota_limit(name, 3)
    with caplog.at_level(logging.INFO, logger="hpsweep"):
        bigger = quota.ensure_quota_limit(name, 4)
        smaller = quota.ensure_quota_limit(name, 2)
        same = quota.ensure_quota_limit(name, 3)
    assert read_limit(name).limit == 3  # the first sweep's, whatever came after
    assert (bigger.usable(4), smaller.usable(2), same.usable(3)) == (3, 2, 3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # an ordinary run: no warning
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"quota limit {name!r} is 3; this sweep's --quota 4: at most 3 trials at once",
                     f"quota limit {name!r} is 3; this sweep's --quota 2: at most 2 trials at once"]


def test_two_sweeps_together_never_hold_more_than_the_limit(embedded_prefect):
    from prefect.concurrency.sync import concurrency

    name = limit_name()
    first = quota.ensure_quota_limit(name, 3)
    second = quota.ensure_quota_limit(name, 4)
    assert (first.usable(3), second.usable(4)) == (3, 3)
    with quota.hold_slot(name, 2), quota.hold_slot(name, 1):  # the first sweep's trials
        with pytest.raises(TimeoutError):  # a trial of the second sweep waits for a free slot
            with concurrency(name, occupy=1, strict=True, timeout_seconds=3, lease_duration=quota.SLOT_LEASE_S):
                pass
    assert read_limit(name).active_slots == 0


def test_trials_of_several_gpus_count_gpus_against_the_limit(embedded_prefect, caplog):
    name = limit_name()
    quota.ensure_quota_limit(name, 4)
    with caplog.at_level(logging.INFO, logger="hpsweep"):
        limit = quota.ensure_quota_limit(name, 8, gpus_per_trial=2)
    assert limit.usable(8) == 4
    assert "at most 4 GPUs at once (2 trials of 2 GPUs)" in caplog.text
    with pytest.raises(SweepInputError, match=r"is 4 but a trial needs 5 GPUs: raise it with `hpsweep quota 5`"):
        quota.ensure_quota_limit(name, 5, gpus_per_trial=5)


def test_an_inactive_limit_stays_inactive_and_caps_nothing(embedded_prefect, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = limit_name()
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=False))
    with caplog.at_level(logging.WARNING, logger="hpsweep"):
        limit = quota.ensure_quota_limit(name, 3)
    assert not limit.active and limit.usable(3) == 3
    assert not read_limit(name).active and read_limit(name).limit == 1
    assert f"quota limit {name!r} is inactive: Prefect does not enforce it" in caplog.text


def test_quota_shows_which_sweeps_hold_the_slots(embedded_prefect):
    name = limit_name()
    quota.ensure_quota_limit(name, 4)
    digits = running_sweep("digits")
    with quota.hold_slot(name, 2, digits.id), quota.hold_slot(name, 1, digits.id), quota.hold_slot(name, 1):
        view = quota.show_quota(name)
    assert view.limit is not None and (view.limit.limit, view.limit.active_slots) == (4, 4)
    assert [(h.slots, h.leases, h.flow_run_id) for h in view.holders] == [(3, 2, digits.id), (1, 1, None)]
    assert view.holders[0].label == f"sweep 'digits' (flow run {digits.name!r}, Running)"
    text = quota.render_quota(view)
    assert f"quota limit {name!r}: 4 slots, 4 in use, 0 free" in text
    assert f"3 slot(s)  sweep 'digits' (flow run {digits.name!r}, Running), 2 leases" in text
    assert "PREFECT_HOME" in text
    after = quota.show_quota(name)  # the slots came back when the sweep let them go
    assert after.limit.active_slots == 0 and after.holders == ()


def test_setting_the_limit_below_the_slots_in_use_needs_force(embedded_prefect):
    name = limit_name()
    assert quota.set_quota(name, 3) == (None, quota.QuotaLimit(name, 3, 0, True, read_limit(name).id))
    with quota.hold_slot(name, 2):
        with pytest.raises(quota.QuotaInUse, match=r"has 2 slots in use: lowering it to 1 .* pass --force"):
            quota.set_quota(name, 1)
        assert read_limit(name).limit == 3
        before, after = quota.set_quota(name, 1, force=True)
    assert (before.limit, after.limit, after.active_slots) == (3, 1, 2)
    assert read_limit(name).limit == 1
