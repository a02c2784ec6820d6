"""`hpsweep quota`: show the shared GPU quota and who holds it, set it, refuse to lower it under
the slots in use without --force; on the embedded default (PREFECT_HOME's database) as on a server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from hpsweep.cli import main
from hpsweep.engine import quota
from tests.conftest import REPO
from tests.test_quota import embedded_prefect, limit_name, read_limit, running_sweep  # noqa: F401


def hpsweep_quota(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["quota", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_quota_before_any_sweep_says_so_and_creates_nothing(embedded_prefect, capsys):
    name = limit_name()
    code, out, _ = hpsweep_quota(capsys, "--limit-name", name)
    assert code == 0
    assert f"no quota limit {name!r} yet in Prefect's local database in PREFECT_HOME" in out
    assert "create it now with `hpsweep quota N`" in out
    with pytest.raises(ObjectNotFound):
        read_limit(name)


def test_quota_sets_shows_and_refuses_to_lower_below_slots_in_use(embedded_prefect, capsys, tmp_path):
    name = limit_name()
    params = tmp_path / "params.yaml"
    params.write_text(f"sweep:\n  quota_limit: {name}\n")  # the name comes from params.yaml, as for `run`
    assert hpsweep_quota(capsys, "4", "--params", str(params))[:2] == (0, f"quota limit {name!r}: 4 slots (0 in use); "
                                                                          "was absent\n")
    digits = running_sweep("digits")
    with quota.hold_slot(name, 3, digits.id):
        code, out, _ = hpsweep_quota(capsys, "--params", str(params))
        assert code == 0
        assert f"quota limit {name!r}: 4 slots, 3 in use, 1 free" in out
        assert f"3 slot(s)  sweep 'digits' (flow run {digits.name!r}, Running)" in out

        code, out, err = hpsweep_quota(capsys, "2", "--params", str(params))
        assert code == 2 and out == ""
        assert err.startswith(f"error: quota limit {name!r} has 3 slots in use: lowering it to 2")
        assert "pass --force to lower it anyway" in err
        assert read_limit(name).limit == 4

        code, out, _ = hpsweep_quota(capsys, "2", "--force", "--params", str(params))
        assert code == 0 and out == f"quota limit {name!r}: 2 slots (3 in use); was 4 slots\n"
        assert read_limit(name).limit == 2
    assert hpsweep_quota(capsys, "3", "--limit-name", name)[:2] == (0, f"quota limit {name!r}: 3 slots (0 in use); "
                                                                        "was 2 slots\n")


def test_quota_rejects_a_size_below_one_and_force_without_a_size(embedded_prefect, capsys):
    name = limit_name()
    code, _, err = hpsweep_quota(capsys, "0", "--limit-name", name)
    assert code == 2 and err.startswith("error: N must be at least 1, got 0")
    code, _, err = hpsweep_quota(capsys, "--force", "--limit-name", name)
    assert code == 2 and err.startswith("error: --force goes with N")


def test_on_a_prefect_server_quota_lists_the_running_sweeps(embedded_prefect, capsys):
    """A Prefect server keeps its leases to itself: the holders are not known, the running sweeps are."""
    name = limit_name()
    with temporary_settings(updates={PREFECT_API_URL: embedded_prefect}):
        quota.ensure_quota_limit(name, 2)
        digits = running_sweep("digits-on-server")
        with quota.hold_slot(name, 1, digits.id):
            code, out, _ = hpsweep_quota(capsys, "--limit-name", name)
    assert code == 0
    assert f"quota limit {name!r}: 2 slots, 1 in use, 1 free" in out
    assert "held by: not known" in out
    assert f"sweep 'digits-on-server' (flow run {digits.name!r}, Running)" in out
    assert f"in the Prefect server at {embedded_prefect}" in out


@pytest.mark.slow
def test_the_embedded_default_keeps_the_limit_in_prefect_home(tmp_path):
    """Without PREFECT_API_URL `quota` reaches PREFECT_HOME's database through the local Prefect
    server, as `hpsweep run` does: the limit is still there after that server stopped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), NO_COLOR="1", COLUMNS="200",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hpsweep.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    try:
        assert cli("quota", "2").stdout == "quota limit 'hpsweep-gpus': 2 slots (0 in use); was absent\n"
        assert cli("server", "stop").stdout.startswith("stopped the local Prefect server at ")
        shown = cli("quota")  # a new local server, on the same database
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("quota limit 'hpsweep-gpus': 2 slots, 0 in use, 2 free\n  held by: nobody\n")
        assert "through hpsweep's local Prefect server at http://127.0.0.1:" in shown.stdout
        assert shown.stderr == ""  # no telemetry or start-up noise from the server
    finally:
        cli("server", "stop", "--force")
