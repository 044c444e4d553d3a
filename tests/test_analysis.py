"""analysis/: tables from results files, the paper's numbers beside them, and the check's verdicts."""

import json

import pytest

from analysis import check, paper, report
from analysis.results import load_profile
from experiments.registry import EXPERIMENTS, PROFILES, RUNS, run_config_args, runs_for
from ddpm.config import get_preset


def write_run(base, profile, run, status="finished", evals=None, step=10):
    d = base / profile / run
    d.mkdir(parents=True)
    train = {"run": run, "profile": profile, "status": status, "data_note": "",
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
            for o in run.overrides:  # the ablation's own choice survives the profile's sizing
                key, value = o.split("=")
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
