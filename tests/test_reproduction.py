"""The whole reproduction at the smoke profile: `bash run_all.sh --profile smoke`, end to end.

Every experiment trains its runs, evaluates them (FID/KID with the offline Inception,
NLL, rate-distortion, figures), and the tables and checks are regenerated; a second
call finds everything done and skips it (an interrupted reproduction resumes).
"""

import json
import os
import subprocess

import pytest

from conftest import REPO, require_shared_data
from experiments.registry import EXPERIMENTS, runs_for


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    data = require_shared_data()
    from ddpm import fidelity

    weights = fidelity.build_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")
    tmp = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "DDPM_SKIP_INSTALL": "1", "DDPM_DATA_DIR": str(data),
           "DDPM_INCEPTION_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(REPO / "run_all.sh"), "--profile", "smoke", "--runs-dir", str(tmp / "runs"),
           "--results-dir", str(tmp / "results")]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return tmp / "results" / "smoke", first.stdout, second.stdout


def test_every_run_trained_and_every_evaluation_wrote_metrics(smoke):
    results, _, _ = smoke
    for run in runs_for(EXPERIMENTS):
        train = json.loads((results / run / "train.json").read_text())
        assert train["status"] in ("finished", "diverged"), (run, train["status"])
        assert train["profile"] == "smoke" and train["config"]["diffusion"]["T"] == 40
    for exp in EXPERIMENTS.values():
        for run in exp.runs:
            for ev in exp.evals:
                m = json.loads((results / run / ev.name / "metrics.json").read_text())
                assert m["run"]["git_commit"] and m["run"]["seed"] == 0
                for key in ("fid", "kid"):
                    if key in ev.metrics.split(","):
                        assert m["results"][key]["value"] is not None and m["results"][key]["n"] == 8
                if "nll" in ev.metrics:
                    assert m["results"]["nll_test"]["value"] > 0


def test_results_hold_no_samples_or_checkpoints(smoke):
    results, _, _ = smoke
    files = [p for p in results.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth") or "shard_" in p.name]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20


def test_tables_are_regenerated_with_the_papers_numbers(smoke):
    results, _, _ = smoke
    md = (results / "tables.md").read_text()
    for title in ("Table 1", "Table 2", "Table 4", "Variance", "Schedule", "MNIST"):
        assert title in md
    assert "Scaled-down runs (smoke profile)" in md and "1.77581" in md
    assert "smoke profile: 4 steps" in md  # each table says at what scale its numbers are


def test_the_fid_floor_of_real_images_is_measured_at_the_same_size(smoke):
    results, _, _ = smoke
    floor = json.loads((results / "fid_floor.json").read_text())
    assert set(floor) == {"cifar10", "mnist"}
    for f, v in floor.items():
        assert v["n"] == 8 and v["n_reference"] == 32 and v["disjoint_from_reference"], f
        assert v["fid"] > 0 and abs(v["kid"]) < 0.1  # real vs real: KID (unbiased) near 0
    assert "### The floor: FID / KID of real images" in (results / "tables.md").read_text()


def test_runs_go_in_parallel_and_a_run_with_an_identical_config_is_reused(smoke):
    results, first, _ = smoke
    assert "runs, 2 at a time" in first  # a 2-core machine: two runs at once, one core each
    # smoke's CelebA-HQ stand-in is configured exactly like eps_simple: trained and evaluated once
    reuse = json.loads((results / "celebahq" / "train.json").read_text())
    own = json.loads((results / "eps_simple" / "train.json").read_text())
    assert reuse["same_as"] == "eps_simple" and reuse["family"] == "celebahq" and "stands in" in reuse["data_note"]
    assert reuse["config"] == own["config"] and "same_as" not in own
    assert (results / "celebahq" / "figures" / "metrics.json").read_bytes() == \
        (results / "eps_simple" / "figures" / "metrics.json").read_bytes()
    assert sum("ddpm train" in line for line in first.splitlines()) == len(runs_for(EXPERIMENTS)) - 1


def test_each_run_keeps_its_last_sample_grid_and_the_report_shows_them(smoke):
    results, _, _ = smoke
    for run in runs_for(EXPERIMENTS):
        assert (results / run / "samples.png").stat().st_size > 0
    assert (results / "figures" / "samples_by_run.png").exists()
    md = (results / "tables.md").read_text()
    assert "### Runs: training outcome" in md and "finished (reuses eps_simple)" in md


def test_second_call_resumes_by_skipping_finished_work(smoke):
    _, first, second = smoke
    # the first call skips only what the reusing run finds done by the run it reuses
    assert all(line.startswith("celebahq| ") for line in first.splitlines() if "skipped" in line)
    n_evals = sum(1 for line in second.splitlines() if "done earlier, skipped" in line)
    assert n_evals == len({(r, ev.name) for e in EXPERIMENTS.values() for r in e.runs for ev in e.evals})
    assert "ddpm train" not in second and "ddpm eval" not in second
