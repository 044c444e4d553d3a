"""analysis/: tables from results files, the paper's numbers beside them, and the check's verdicts."""

import json

import pytest

from analysis import check, paper, report
from analysis.results import load_profile
from experiments.registry import EXPERIMENTS, PROFILES, RUNS, run_config_args, runs_for
from ddpm.config import get_preset


def write_run(base, profile, run, status="finished", evals=None, step=10, reason=None):
    d = base / profile / run
    d.mkdir(parents=True)
    train = {"run": run, "profile": profile, "status": status, "data_note": "", "reason": reason,
             "config": {"train": {"batch_size": 128, "steps": step}, "diffusion": {"T": 1000}},
             "run_info": {"num_params": 35_746_307, "device_name": "test GPU", "dataset": "cifar10",
                          "dataset_size": 50000},
             "stats": {"last": {"step": step}}}
    (d / "train.json").write_text(json.dumps(train))
    for name, results in (evals or {}).items():
        (d / name).mkdir()
        (d / name / "metrics.json").write_text(json.dumps({"run": {}, "results": results}))


def paper_like(fid=3.17, is_=9.46, nll=3.75):
    rows = [{"reverse_step": s, "rate_bpd": r, "distortion_rmse": dd} for s, (r, dd) in paper.TABLE4.items()]
    return {
        "main": {"fid": {"value": fid, "n": 50000, "n_reference": 50000, "reference": "cifar10:train"},
                 "is": {"value": is_, "std": 0.1, "n": 50000},
                 "nll_test": {"value": nll, "se": 0.01, "n": 10000}, "nll_train": {"value": 3.72, "se": 0.01},
                 "rd": {"table4": rows, "definition": "test"}},
    }


def test_every_run_builds_a_valid_config_at_every_profile():
    for profile in PROFILES:
        for run in RUNS.values():
            preset, overrides = run_config_args(run, profile)
            cfg = get_preset(preset, overrides)
            for key, value in run.overrides.items():  # the ablation's own choice survives the profile's sizing
                section, field = key.split(".")
                assert str(getattr(getattr(cfg, section), field)) == value


def test_table2_covers_all_six_cells_and_experiments_name_known_runs():
    assert set(paper.TABLE2_RUNS.values()) == set(EXPERIMENTS["table2"].runs)
    assert len(EXPERIMENTS["table2"].runs) == 6
    assert set(runs_for(EXPERIMENTS)) == set(RUNS)


def test_report_fills_tables_from_results_and_marks_unstable_runs(tmp_path):
    write_run(tmp_path, "quick", "eps_simple", evals=paper_like(fid=41.5))
    write_run(tmp_path, "quick", "mu_simple", status="diverged", step=123)
    written = report.write_report(tmp_path, "quick")
    md = (tmp_path / "quick" / "tables.md").read_text()
    assert "Scaled-down runs (quick profile)" in md
    assert "41.50" in md  # our FID, read from the file
    assert "3.17" in md  # the paper's, alongside
    assert "unstable (diverged near step 123)" in md
    assert "not run" in md  # runs without results say so
    assert "1.77581" in md  # Table 4's paper column
    assert (tmp_path / "quick" / "tables.tex").read_text().count(r"\begin{tabular}") == len(report.tables({}))
    assert any(p.suffix == ".png" for p in written)


def test_check_judges_only_the_paper_profile(tmp_path, capsys):
    write_run(tmp_path, "paper", "eps_simple", evals=paper_like())
    assert check.main(["--results-dir", str(tmp_path), "--profile", "paper"]) == 0
    (tmp_path / "paper").rename(tmp_path / "old")
    write_run(tmp_path, "paper", "eps_simple", evals=paper_like(fid=9.0))
    assert check.main(["--results-dir", str(tmp_path), "--profile", "paper"]) == 1
    assert "FAIL eps_simple.fid" in capsys.readouterr().out
    # the same bad numbers from a scaled profile are reported, not judged
    write_run(tmp_path, "quick", "eps_simple", evals=paper_like(fid=9.0))
    assert check.main(["--results-dir", str(tmp_path), "--profile", "quick"]) == 0
    assert "not comparable: scaled-down run" in capsys.readouterr().out


def test_results_loader_reads_every_eval(tmp_path):
    write_run(tmp_path, "smoke", "eps_simple", evals=paper_like())
    runs = load_profile(tmp_path, "smoke")
    r = runs["eps_simple"]
    assert r.value("fid") == pytest.approx(3.17) and r.value("nll_test") == pytest.approx(3.75)
    assert "35.75M params" in r.scale() and "test GPU" in r.scale()


def test_tables_read_the_main_evaluation_not_its_ablations(tmp_path):
    evals = paper_like(nll=3.75)
    evals["beta_tilde"] = {"nll_test": {"value": 9.99, "se": 0.1}, "fid": {"value": 99.9}}
    write_run(tmp_path, "quick", "eps_simple", evals=evals)
    r = load_profile(tmp_path, "quick")["eps_simple"]
    assert r.value("nll_test") == pytest.approx(3.75) and r.value("nll_test", "beta_tilde") == pytest.approx(9.99)
    md = report.to_markdown(report.table1(load_profile(tmp_path, "quick")))
    assert "3.750" in md and "9.99" not in md


def test_report_refreshes_the_tables_embedded_in_results_readme(tmp_path):
    write_run(tmp_path, "quick", "eps_simple", evals=paper_like(fid=41.5))
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nreading above\n<!-- tables:quick -->\nstale 99.99\n<!-- /tables:quick -->\n"
                      "reading below\n")
    assert readme in report.write_report(tmp_path, "quick")
    text = readme.read_text()
    assert "stale" not in text and "41.50" in text and "#### Table 1" in text
    assert text.startswith("# Results\n\nreading above\n") and text.endswith("<!-- /tables:quick -->\nreading below\n")
    report.write_report(tmp_path, "quick")  # idempotent
    assert readme.read_text() == text


# ------------------------------------------------------------------ the check's verdicts


def _verdicts(tmp_path, capsys, name="paper"):
    rc = check.main(["--results-dir", str(tmp_path), "--profile", name])
    out = capsys.readouterr().out
    return rc, {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("  ")}, out


@pytest.mark.parametrize("fid, verdict", [
    (3.17, "ok"), (2.80, "FAIL"), (3.60, "FAIL"),  # at the paper, too low, too high
    (3.17 + 0.35, "ok"), (3.17 - 0.35, "ok"),  # exactly at the tolerance: |3.52 - 3.17| = 0.3500000000000001
    (3.17 + 0.3501, "FAIL"), (3.17 - 0.3501, "FAIL"),  # just outside
    (float("nan"), "FAIL"), (float("inf"), "FAIL"),  # not a number is not a result within tolerance
])
def test_check_verdict_on_fid(tmp_path, capsys, fid, verdict):
    write_run(tmp_path, "paper", "eps_simple", evals=paper_like(fid=fid))
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert lines["eps_simple.fid"].split()[0] == verdict, lines["eps_simple.fid"]
    assert rc == (1 if verdict == "FAIL" else 0), out
    assert lines["eps_simple.nll_test"].split()[0] == "ok"


def test_check_tolerance_boundary_for_every_check():
    for _, _, _, ref, tol, _ in check.CHECKS:
        assert check.within(ref + tol, ref, tol) and check.within(ref - tol, ref, tol)
        assert not check.within(ref + tol * 1.001, ref, tol) and not check.within(ref - tol * 1.001, ref, tol)


def test_check_fails_a_diverged_run_the_paper_trained(tmp_path, capsys):
    """eps_simple trained to FID 3.17 in the paper: its divergence at the paper profile is a failure
    of every check on it, not 'nothing to judge yet'."""
    write_run(tmp_path, "paper", "eps_simple", status="diverged", step=4321)
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert rc == 1, out
    assert "nothing to judge" not in out
    for name in ("eps_simple.fid", "eps_simple.is", "eps_simple.nll_test", "eps_simple.table4[1000].rate_bpd"):
        assert lines[name].startswith("  FAIL") and "diverged (near step 4321)" in lines[name], lines[name]
    # the same at a scaled profile is reported, not judged
    write_run(tmp_path, "quick", "eps_simple", status="diverged", step=12)
    rc, lines, out = _verdicts(tmp_path, capsys, "quick")
    assert rc == 0 and "FAIL" not in out and "diverged (near step 12)" in lines["eps_simple.fid"]


def test_check_reports_missing_and_unavailable_values_without_judging_them(tmp_path, capsys):
    # nothing at all
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert rc == 0 and "nothing to judge yet" in out and "no value (paper 3.17): not run" in lines["eps_simple.fid"]
    # IS unavailable offline, a run that crashed, a metric never evaluated
    evals = paper_like()
    evals["main"]["is"] = {"value": None, "std": None,
                           "unavailable": "Inception Score not available offline: no logits layer"}
    del evals["main"]["nll_train"]
    write_run(tmp_path, "paper", "eps_simple", evals=evals)
    write_run(tmp_path, "paper", "eps_vlb", status="failed")
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert rc == 0, out
    assert lines["eps_simple.fid"].startswith("  ok")
    assert "no value" in lines["eps_simple.is"] and "Inception Score not available offline" in lines["eps_simple.is"]
    assert "no value" in lines["eps_simple.nll_train"] and "not evaluated" in lines["eps_simple.nll_train"]
    assert "no value" in lines["eps_vlb.fid"] and "training failed" in lines["eps_vlb.fid"]
    assert "no value" in lines["mu_vlb.fid"] and "not run" in lines["mu_vlb.fid"]
    assert "nothing to judge" not in out


def test_check_never_judges_samples_of_a_fewer_step_sampler_against_the_paper(tmp_path, capsys):
    evals = paper_like(fid=3.17)
    evals["main"]["fid"]["sampler_spec"] = {"sampler": "ddim", "steps": 50, "of_T": 1000, "eta": 0.0,
                                            "skip": "uniform"}
    write_run(tmp_path, "paper", "eps_simple", evals=evals)
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert "no value" in lines["eps_simple.fid"] and "ddim on 50 steps, not the paper's sampler" in lines["eps_simple.fid"]
    assert lines["eps_simple.nll_test"].split()[0] == "ok"  # the bound does not depend on the sampler


def test_sampler_steps_table_and_figure_sit_beside_the_ddim_papers_trend(tmp_path):
    evals = paper_like(fid=3.3)
    evals["main"]["fid"]["sampler_spec"] = {"sampler": "ancestral", "steps": 1000}
    for kind, k, fid in (("ddim", 10, 14.0), ("ddim", 100, 4.5), ("respaced", 10, 40.0)):
        evals[f"{kind}_{k}"] = {"fid": {"value": fid, "sampler_spec": {"sampler": kind, "steps": k}},
                                "kid": {"value": 0.01, "std": 0.001}}
    write_run(tmp_path, "quick", "eps_simple", evals=evals)
    runs = load_profile(tmp_path, "quick")
    t = report.sampler_steps_table(runs)
    rows = {(r[0], r[1]): r for r in t["rows"]}
    assert rows[("ddim", "10")][2:] == ["14.00", "0.010 +- 0.001", "13.36"]  # DDIM Table 1, eta 0, S = 10
    # respaced and ancestral with the run's variance beta: the DDIM paper's sigma-hat row (3.17 at S = 1000)
    assert rows[("respaced", "10")][4] == "367.43" and rows[("ancestral (all T steps)", "1000")][2:5:2] == ["3.30", "3.17"]
    assert [r[0] for r in t["rows"]] == ["respaced", "ancestral (all T steps)", "ddim", "ddim"]
    assert report.sampler_steps_figure(runs, tmp_path / "f.png").stat().st_size > 0
    # without fewer-step evaluations there is no such table
    write_run(tmp_path, "paper", "eps_simple", evals=paper_like())
    assert report.sampler_steps_table(load_profile(tmp_path, "paper")) is None


def test_the_released_weights_are_evaluated_not_trained_and_judged_only_when_present(tmp_path, capsys):
    from experiments import run as R

    assert "released" in EXPERIMENTS and "released" not in R.experiments_for("quick")
    results, released = tmp_path / "results", tmp_path / "released"
    rec = R.released_run("released_cifar10", "paper", results, released)
    assert rec["status"] == "missing" and "hf download google/ddpm-cifar10-32" in rec["data_note"]
    rc, lines, out = _verdicts(results, capsys)
    assert rc == 0 and "released weights not found" in lines["released_cifar10.fid"]
    (released / "ddpm-cifar10-32").mkdir(parents=True)
    assert R.released_run("released_cifar10", "paper", results, released)["status"] == "finished"
    # its numbers are judged like the paper's: 3.17 +- 0.2
    evals = paper_like(fid=3.40)
    write_run(tmp_path / "r2", "paper", "released_cifar10", evals=evals)
    rc, lines, out = _verdicts(tmp_path / "r2", capsys)
    assert rc == 1 and lines["released_cifar10.fid"].startswith("  FAIL")
    assert lines["released_cifar10.nll_test"].startswith("  ok")


OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_failed_training_is_shown_as_failed_with_its_reason_never_as_unstable(tmp_path, capsys):
    """mu_simple is a cell the paper reports as unstable: a crash there must not read as a reproduction."""
    write_run(tmp_path, "paper", "eps_simple", evals=paper_like())
    write_run(tmp_path, "paper", "mu_simple", status="failed", reason=OOM)
    write_run(tmp_path, "paper", "eps_vlb", status="failed", reason=None)
    write_run(tmp_path, "paper", "mu_vlb", status="diverged", step=77)
    report.write_report(tmp_path, "paper")
    md = (tmp_path / "paper" / "tables.md").read_text()
    table2 = md.split("### Table 2")[1].split("###")[0]
    mu_simple_row = next(ln for ln in table2.splitlines() if ln.startswith("| ") and "unstable)" in ln
                         and "failed: torch.OutOfMemoryError" in ln)
    assert mu_simple_row.count("unstable") == 1  # the paper's column only
    assert "unstable (diverged near step 77)" in table2  # a real divergence still reads as such
    runs_rows = md.split("### Runs")[1]
    assert f"| mu_simple | failed: {OOM} |" in runs_rows and "| eps_vlb | failed: exit code ? |" in runs_rows
    rc, lines, out = _verdicts(tmp_path, capsys)
    # a crash is not judged (it says nothing about the paper); the divergence of a run the paper trained is
    assert rc == 1 and [n for n, ln in lines.items() if ln.startswith("  FAIL")] == ["mu_vlb.fid"], out
    assert "diverged (near step 77)" in lines["mu_vlb.fid"]
    assert lines["eps_vlb.fid"].startswith("  CHECK") and "no value" in lines["eps_vlb.fid"]
    assert "training failed: exit code ?" in lines["eps_vlb.fid"]
    (tmp_path / "paper" / "mu_vlb").rename(tmp_path / "mu_vlb")
    write_run(tmp_path, "paper", "mu_vlb", status="failed", reason=OOM)
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert rc == 0 and f"no value (paper 13.22): training failed: {OOM}" in lines["mu_vlb.fid"], out


def test_check_judges_the_main_evaluation_never_an_ablation_of_it(tmp_path, capsys):
    evals = {"beta_tilde": paper_like(fid=3.17)["main"]}  # only the beta-tilde ablation exists
    write_run(tmp_path, "paper", "eps_simple", evals=evals)
    rc, lines, out = _verdicts(tmp_path, capsys)
    assert "no value" in lines["eps_simple.fid"] and "not evaluated" in lines["eps_simple.fid"]


def test_the_sampler_steps_table_says_when_its_points_come_from_different_commits(tmp_path):
    evals = paper_like(fid=3.3)
    evals["main"]["fid"]["sampler_spec"] = {"sampler": "ancestral", "steps": 1000}
    evals["ddim_10"] = {"fid": {"value": 14.0, "sampler_spec": {"sampler": "ddim", "steps": 10}}}
    write_run(tmp_path, "quick", "eps_simple", evals=evals)
    for name, commit in (("main", "aaa"), ("ddim_10", "bbb")):
        f = tmp_path / "quick" / "eps_simple" / name / "metrics.json"
        m = json.loads(f.read_text())
        m["run"]["git_commit"] = commit
        f.write_text(json.dumps(m))
    notes = report.sampler_steps_table(load_profile(tmp_path, "quick"))["notes"]
    assert any("different commits" in n and "aaa: ancestral 1000" in n and "bbb: ddim 10" in n for n in notes)
