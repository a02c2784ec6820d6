"""`dvc repro` on a fresh copy of this project: the demo end to end, the no-op rerun, one changed
combination, changed data; provenance on the runs checked against DVC's and git's own records;
`dvc push`/`dvc pull` through an S3 endpoint on loopback; a trial host staging from that remote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hpsweep.datacache import DataCache
from hpsweep.dvcdata import data_ref
from tests.conftest import REPO

pytestmark = pytest.mark.slow

VENV_BIN = str(Path(sys.executable).parent)
LATEST = "reports/digits-mlp/latest"  # dvc.yaml's outs: the newest sweep's report


class DvcProject:
    """A git + DVC working copy of this repository in a temporary folder, driven by the real CLIs."""

    def __init__(self, root: Path, home: Path):
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "HPSWEEP_"))}
        env.update(PATH=os.pathsep.join([VENV_BIN, env.get("PATH", "")]), NO_COLOR="1", COLUMNS="200",
                   HPSWEEP_HASH_MEMO=str(home / "hashes.json"), DVC_NO_ANALYTICS="1",
                   GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
                   GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
        self.env = env

    def run(self, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(cmd)} → {result.returncode}\n{result.stdout[-4000:]}\n" \
                                           f"{result.stderr[-4000:]}"
        return result

    def git_commit(self, message: str) -> str:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)
        return self.run("git", "rev-parse", "HEAD").stdout.strip()

    def lock_md5(self, path: str) -> str:
        """The md5 `dvc.lock` recorded for one stage output."""
        lock = yaml.safe_load((self.root / "dvc.lock").read_text())
        for stage in lock["stages"].values():
            for out in stage.get("outs", []):
                if out["path"] == path:
                    return out["md5"]
        raise KeyError(path)

    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")

    def trial_runs(self) -> list:
        client = self.client()
        exp = client.get_experiment_by_name("digits-mlp")
        return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if "mlflow.parentRunId" in r.data.tags]

    def parent_runs(self) -> list:
        client = self.client()
        exp = client.get_experiment_by_name("digits-mlp")
        return [r for r in client.search_runs([exp.experiment_id], max_results=1000, order_by=["start_time DESC"])
                if "mlflow.parentRunId" not in r.data.tags]


def copy_project(dest: Path) -> None:
    """The files git would have in a fresh clone of this working tree (committed or not, never ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    root = tmp_path_factory.mktemp("dvc-project")
    copy_project(root)
    project = DvcProject(root, tmp_path_factory.mktemp("home"))
    project.run("git", "init", "-q")
    project.git_commit("fresh clone")
    return project


def test_dvc_repro_runs_the_demo_end_to_end(dvc_project: DvcProject):
    first = dvc_project.run("dvc", "repro")
    assert "Running stage 'sweep'" in first.stdout
    board = json.loads((dvc_project.root / f"{LATEST}/leaderboard.json").read_text())
    assert board["counts"] == {"total": 16, "finished": 16, "failed": 0, "reused": 0}
    assert (dvc_project.root / LATEST).resolve().name == board["sweep_id"]  # the sweep's own folder
    metrics = json.loads(dvc_project.run("dvc", "metrics", "show", "--json").stdout)
    best = metrics[""]["data"][f"{LATEST}/best.json"]["data"]
    assert best["best_f1"] == board["rows"][0]["f1"] > 0.9
    plots = dvc_project.run("dvc", "plots", "show", "--json").stdout
    assert f"{LATEST}/f1_by_combination.png" in plots and f"{LATEST}/f1_by_hparam.png" in plots


def test_dvc_plots_render_offline(dvc_project: DvcProject):
    """`dvc plots show` writes a page that needs no internet: the report's PNGs, copied beside it."""
    dvc_project.run("dvc", "plots", "show")
    page = (dvc_project.root / "dvc_plots" / "index.html").read_text()
    assert re.findall(r"https?://", page) == []  # no CDN script (a Vega plot would load three)
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 2 and all((dvc_project.root / "dvc_plots" / src).stat().st_size > 1000 for src in images)
    status = dvc_project.run("git", "status", "--porcelain").stdout
    assert "dvc_plots" not in status  # gitignored


def test_provenance_matches_dvc_and_git(dvc_project: DvcProject):
    head = dvc_project.git_commit("after the first sweep")  # dvc.lock committed: the tree is clean
    dvc_project.run("dvc", "repro", "--force", "sweep")  # a sweep on a clean tree at a known commit
    expected = {
        "hpsweep.data_version": f"{dvc_project.lock_md5('data/train.csv')}/{dvc_project.lock_md5('data/val.csv')}",
        "hpsweep.git_commit": head,
    }
    parent = dvc_project.parent_runs()[0]
    assert {k: parent.data.tags[k] for k in expected} == expected
    trained_at = dvc_project.run("git", "rev-parse", "HEAD~1").stdout.strip()  # the first sweep's commit
    for run in dvc_project.trial_runs():  # reused by this sweep: they keep the provenance they trained with
        assert {k: run.data.tags[k] for k in ("hpsweep.data_version", "hpsweep.git_commit")} == \
            {"hpsweep.data_version": expected["hpsweep.data_version"], "hpsweep.git_commit": trained_at}
    header = (dvc_project.root / f"{LATEST}/leaderboard.md").read_text().split("| rank")[0]
    assert expected["hpsweep.data_version"] in header and head in header
    assert parent.data.tags["hpsweep.spec_hash"] in header


def test_second_repro_does_nothing(dvc_project: DvcProject):
    before = len(dvc_project.trial_runs())
    again = dvc_project.run("dvc", "repro")
    assert "Stage 'sweep' didn't change, skipping" in again.stdout
    assert len(dvc_project.trial_runs()) == before


def test_one_changed_combination_trains_only_that_one(dvc_project: DvcProject):
    before = {r.info.run_id for r in dvc_project.trial_runs()}
    combos = dvc_project.root / "params/combinations.yaml"
    data = yaml.safe_load(combos.read_text())
    data["combinations"][0]["alpha"] = 0.05  # a value no earlier trial had
    combos.write_text(yaml.safe_dump(data, sort_keys=False))
    previous = json.loads((dvc_project.root / f"{LATEST}/leaderboard.json").read_text())["sweep_id"]
    kept = {p.name: p.read_bytes() for p in (dvc_project.root / "reports/digits-mlp" / previous).iterdir()}
    rerun = dvc_project.run("dvc", "repro")
    assert "Running stage 'sweep'" in rerun.stdout
    # DVC removes a stage's outs before running it: `persist` keeps it from deleting, through
    # `latest`, the previous sweep's report, which stays as it was in its own folder.
    assert {p.name: p.read_bytes() for p in (dvc_project.root / "reports/digits-mlp" / previous).iterdir()} == kept
    assert (dvc_project.root / LATEST).resolve().name != previous
    new = [r for r in dvc_project.trial_runs() if r.info.run_id not in before]
    assert len(new) == 1 and json.loads(new[0].data.tags["hpsweep.hparams"])["alpha"] == 0.05
    board = json.loads((dvc_project.root / f"{LATEST}/leaderboard.json").read_text())
    assert board["counts"] == {"total": 16, "finished": 1, "failed": 0, "reused": 15}


def test_changed_data_never_reuses_old_trials(dvc_project: DvcProject):
    params = dvc_project.root / "params.yaml"
    params.write_text(params.read_text().replace("seed: 0", "seed: 1"))  # another split: new data bytes
    old_train = dvc_project.lock_md5("data/train.csv")
    dvc_project.run("dvc", "repro")
    assert dvc_project.lock_md5("data/train.csv") != old_train
    board = json.loads((dvc_project.root / f"{LATEST}/leaderboard.json").read_text())
    assert board["counts"]["reused"] == 0 and board["counts"]["finished"] == 16


def test_push_and_pull_through_s3(dvc_project: DvcProject, s3_endpoint, tmp_path: Path):
    bucket = s3_endpoint.bucket()
    dvc_project.env.update(s3_endpoint.env)
    dvc_project.run("dvc", "remote", "add", "-f", "s3", f"s3://{bucket}/dvc")
    dvc_project.run("dvc", "remote", "modify", "s3", "endpointurl", s3_endpoint.url)
    dvc_project.run("dvc", "push", "-r", "s3")
    train_md5 = dvc_project.lock_md5("data/train.csv")
    keys = {o["Key"] for o in s3_endpoint.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"dvc/files/md5/{train_md5[:2]}/{train_md5[2:]}" in keys

    data = dvc_project.root / "data"
    original = {p.name: p.read_bytes() for p in data.glob("*.csv")}
    shutil.rmtree(data)
    shutil.rmtree(dvc_project.root / ".dvc" / "cache")  # nothing local left: pull must use S3
    dvc_project.run("dvc", "pull", "-r", "s3")
    assert {p.name: p.read_bytes() for p in data.glob("*.csv")} == original

    # A trial host with no copy of the project fetches the same bytes from the default remote.
    dvc_project.run("dvc", "remote", "default", "s3")
    ref = data_ref(data / "train.csv")
    assert ref.md5 == train_md5 and ref.remote.url == f"s3://{bucket}/dvc"
    cache = DataCache(tmp_path / "host-cache")
    assert cache.stage(ref).read_bytes() == original["train.csv"]
    assert cache.stats.bytes_fetched == len(original["train.csv"])
