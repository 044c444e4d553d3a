"""Regenerate the paper's tables and plots from results/, the paper's numbers alongside.

    python -m analysis.report                 # every profile present under results/
    python -m analysis.report --profile quick

Writes, per profile, results/<profile>/tables.md, results/<profile>/tables.tex and
results/<profile>/figures/*.png. Nothing here is typed by hand: every number comes from
a metrics.json or train.json (Fig. 5's curve: rate_distortion.npz), and every table says
at what scale its numbers were obtained. Numbers from the quick and smoke profiles are
scaled-down runs; they are shown next to the paper's for orientation, never as a
reproduction of them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import paper as P
from .results import RunResult, load_profile, profiles_present

Table = Dict[str, object]  # {"title", "header": [...], "rows": [[...]], "notes": [...]}


def _f(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pm(r: Optional[dict], digits: int = 2, err: str = "std") -> str:
    if r is None:
        return "not run"
    if r.get("value") is None:
        why = str(r.get("unavailable", ""))
        return "n/a offline" if "offline" in why else "n/a"
    e = r.get(err)
    return _f(r["value"], digits) + (f" +- {_f(e, digits)}" if e is not None else "")


def _status_cell(run: Optional[RunResult]) -> Optional[str]:
    """A cell for a run that has no numbers: not run, diverged (the paper's '-'), or failed (a
    crash: out of memory, a killed process, ...; never shown as unstable)."""
    if run is None:
        return "not run"
    if run.status == "diverged":
        step = (run.train.get("stats", {}).get("last") or {}).get("step", "?")
        return f"unstable (diverged near step {step})"
    if run.status != "finished":
        out = run.outcome
        return out if len(out) <= 70 else out[:67] + "..."
    return None


def _scale_notes(runs: Sequence[Optional[RunResult]]) -> List[str]:
    """One line per distinct scale, naming the runs that share it (they usually all do)."""
    groups: Dict[str, List[str]] = {}
    for r in runs:
        if r is not None:
            line = r.scale()
            for key in ("fid", "nll_test"):
                m = r.metric(key)
                if m:
                    line += f"; {key}: N={m.get('n') or m.get('n_images') or '?'}"
                    if key == "fid":
                        line += f" vs {m.get('n_reference', '?')} reference images ({m.get('reference', '?')})"
            if r.train.get("data_note"):
                line += f"; data: {r.train['data_note']}"
            groups.setdefault(line, []).append(r.name)
    return [f"{', '.join(names)}: {line}" for line, names in groups.items()]


def table1(runs: Dict[str, RunResult]) -> Table:
    rows = []
    for name, ref in P.TABLE1.items():
        r = runs.get(name)
        blocked = _status_cell(r)
        if blocked:
            ours = [blocked] * 4
        else:
            nt, ntr = r.metric("nll_test"), r.metric("nll_train")
            ours = [_pm(r.metric("is")), _f(r.value("fid")),
                    (_pm(nt, 3, "se") if nt else "not run"), (_pm(ntr, 3, "se") if ntr else "not run")]
        rows.append([ref["label"], *ours, f"{ref['is'][0]} +- {ref['is'][1]}", f"{ref['fid']}",
                     f"<= {ref['nll_test']} ({ref['nll_train']})"])
    return {"title": "Table 1: CIFAR10 sample quality and NLL (bits/dim)",
            "header": ["objective", "IS", "FID (vs train)", "NLL test", "NLL train",
                       "paper IS", "paper FID", "paper NLL test (train)"],
            "rows": rows, "notes": _scale_notes([runs.get(n) for n in P.TABLE1])}


def table2(runs: Dict[str, RunResult]) -> Table:
    def cell(name):
        r = runs.get(name)
        blocked = _status_cell(r)
        if blocked:
            return blocked
        if r.metric("fid") is None:
            return "not run"
        kid = r.metric("kid")  # unbiased at small N, where FID is not: shown when measured
        return f"{_pm(r.metric('is'))} / {_f(r.value('fid'))}" + (f" (KID {_pm(kid, 3)})" if kid else "")

    def paper(name):
        v = P.TABLE2[name]
        return "- (unstable)" if v is None else f"{v[0]} +- {v[1]} / {v[2]}"

    rows = [[label, cell(P.TABLE2_RUNS[(row, "mu")]), paper(P.TABLE2_RUNS[(row, "mu")]),
             cell(P.TABLE2_RUNS[(row, "eps")]), paper(P.TABLE2_RUNS[(row, "eps")])]
            for row, label in P.TABLE2_ROWS]
    return {"title": "Table 2: parameterization x objective (IS / FID, and KID where measured)",
            "header": ["objective", "mu-tilde prediction", "paper", "eps prediction", "paper"],
            "rows": rows, "notes": _scale_notes([runs.get(n) for n in P.TABLE2])}


def table4(runs: Dict[str, RunResult]) -> Table:
    """The Table 4 rows the evaluation computed (metrics.json rd.table4, written in the paper's
    row order: s = T, 0.9T, ..., 0.1T), each beside the paper's row."""
    r = runs.get("eps_simple")
    rd = r.metric("rd") if r else None
    ours = (rd or {}).get("table4", [])
    T = ours[0]["reverse_step"] if ours else 1000  # row 0 is the whole chain, s = T
    rows = []
    for k, (step, (rate, dist)) in enumerate(P.TABLE4.items()):
        o = ours[k] if k < len(ours) else None
        rows.append([f"{step}" + (f" ({o['reverse_step']} of T={T})" if o and T != 1000 else ""),
                     _f(o["rate_bpd"], 5) if o else "not run", _f(o["distortion_rmse"], 5) if o else "not run",
                     f"{rate:.5f}", f"{dist:.5f}"])
    notes = _scale_notes([r])
    if rd:
        notes.append(f"definition: {rd.get('definition', '')}")
    return {"title": "Table 4: rate (bits/dim) and distortion (RMSE on [0, 255]) along the reverse process",
            "header": ["reverse step", "rate", "distortion", "paper rate", "paper distortion"],
            "rows": rows, "notes": notes}


def ablation_table(runs, title, pairs, evals) -> Table:
    """One row per (run, eval): FID, KID, NLL; e.g. the variance or the schedule ablation."""
    rows = []
    for run_name, eval_name, label in pairs:
        r = runs.get(run_name)
        blocked = _status_cell(r)
        samples_eval, nll_eval = evals.get(eval_name, (eval_name, eval_name))
        if blocked:
            rows.append([label, blocked, blocked, blocked])
            continue
        kid = r.metric("kid", samples_eval)
        fid = r.metric("fid", samples_eval)
        rows.append([label, _f(fid["value"]) if fid else "not run", _pm(kid, 4),
                     _pm(r.metric("nll_test", nll_eval), 3, "se")])
    return {"title": title, "header": ["model", "FID", "KID", "NLL test (bits/dim)"], "rows": rows,
            "notes": _scale_notes([runs.get(n) for n in dict.fromkeys(p[0] for p in pairs)])}


def tables(runs: Dict[str, RunResult]) -> List[Table]:
    beta = ("main", "main")
    bt = ("beta_tilde", "beta_tilde")
    out = [table1(runs), table2(runs), table4(runs)]
    out.append(ablation_table(runs, "Variance: sigma^2 = beta vs beta-tilde (same checkpoints)", [
        ("eps_simple", "beta", "L_simple, sigma^2 = beta"), ("eps_simple", "bt", "L_simple, sigma^2 = beta-tilde"),
        ("eps_vlb", "beta", "L, sigma^2 = beta"), ("eps_vlb", "bt", "L, sigma^2 = beta-tilde")],
        {"beta": beta, "bt": bt}))
    out.append(ablation_table(runs, "Schedule: linear vs cosine", [
        ("eps_simple", "beta", "L_simple, linear"), ("eps_simple_cosine", "beta", "L_simple, cosine"),
        ("eps_vlb", "beta", "L, linear"), ("eps_vlb_cosine", "beta", "L, cosine")], {"beta": beta}))
    out.append(ablation_table(runs, "MNIST (the seed report's setting)", [
        ("mnist_seed", "beta", "L_simple, MNIST")], {"beta": beta}))
    steps = sampler_steps_table(runs)
    if steps:
        out.append(steps)
    out.append(runs_table(runs))
    return out


def _sampler_points(r: RunResult) -> Dict[str, Dict[int, Dict[str, dict]]]:
    """{sampler: {K: {"fid": ..., "kid": ...}}} of a run's evaluations, the ancestral sampler's
    K being T (ddpm.sampling.Sampler records its kind and K with every sample-based number)."""
    out: Dict[str, Dict[int, Dict[str, dict]]] = {}
    for m in r.evals.values():
        res = m.get("results", {})
        fid = res.get("fid")
        if not fid or m.get("run", {}).get("variance") != (r.train.get("config") or {}).get("diffusion", {}).get("var_type"):
            continue  # another variance (the beta-tilde ablation) is not a point of this curve
        run = m.get("run", {})  # results before sampler_spec existed: ancestral over all T steps
        spec = fid.get("sampler_spec") or {"sampler": "ancestral", "steps": run.get("T", run.get("steps"))}
        if spec.get("steps") is not None:
            out.setdefault(spec["sampler"], {})[int(spec["steps"])] = {
                "fid": fid, "kid": res.get("kid"), "commit": run.get("git_commit")}
    return out


def sampler_steps_table(runs: Dict[str, RunResult]) -> Optional[Table]:
    """FID/KID against the number of sampling steps K (beyond the paper), beside the DDIM
    paper's Table 1 trend; only when fewer-step evaluations exist."""
    r = runs.get("eps_simple")
    points = _sampler_points(r) if r else {}
    if not (set(points) - {"ancestral"}):
        return None
    var = (r.metric("fid", "main") or {}).get("variance") or "beta"
    rows = []
    for kind in ("respaced", "ancestral", "ddim"):
        paper = P.DDIM_ROW_FOR["ddim" if kind == "ddim" else var]
        ref = dict(zip(P.DDIM_TABLE1_STEPS, P.DDIM_TABLE1.get(paper, ())))
        for k, pt in sorted(points.get(kind, {}).items()):
            rows.append(["ancestral (all T steps)" if kind == "ancestral" else kind, str(k), _f(pt["fid"]["value"]),
                         _pm(pt["kid"], 3) if pt["kid"] else "n/a", _f(ref[k]) if k in ref else "-"])
    return {"title": "Sampler steps (beyond the paper): FID / KID against the number of steps K",
            "header": ["sampler", "K", "FID", "KID", f"DDIM paper Table 1 FID (CIFAR10, 50k; ddim: eta 0, "
                       f"others: {P.DDIM_ROW_FOR.get(var, '?')})"],
            "rows": rows,
            "notes": _scale_notes([r]) + _provenance_notes(points) + [
                f"respaced: DDPM on K of the T steps with the run's own variance ({var}); ddim: eta = 0; the "
                "paper's column is the DDIM paper's CIFAR10 trend at full scale (the row of the same sampler and "
                "variance: sigma-hat for beta, eta 1 for beta-tilde), for the shape of the curve only"]}


def _provenance_notes(points) -> List[str]:
    """A note when the curve's points were evaluated at different commits: then they may come
    from different trainings of the same config (runs/ is not in git; a fresh machine retrains)."""
    commits: Dict[str, List[str]] = {}
    for kind, by_k in points.items():
        for k, pt in by_k.items():
            commits.setdefault(str(pt.get("commit")), []).append(f"{kind} {k}")
    if len(commits) < 2:
        return []
    return ["the points were evaluated at different commits, possibly from different trainings of the same "
            "config (equal up to float rounding at best): " + "; ".join(f"{c}: {', '.join(v)}" for c, v in commits.items())]


def sampler_steps_figure(runs: Dict[str, RunResult], path: Path) -> Optional[Path]:
    """FID against K, ours beside the DDIM paper's Table 1 (log-log)."""
    r = runs.get("eps_simple")
    points = _sampler_points(r) if r else {}
    if not (set(points) - {"ancestral"}):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    full = points.get("ancestral", {})
    for kind, marker in (("respaced", "o"), ("ddim", "s")):
        curve = {**points.get(kind, {}), **({} if kind == "ddim" else full)}
        if curve:
            ks = sorted(curve)
            ax.plot(ks, [curve[k]["fid"]["value"] for k in ks], marker=marker, label=kind)
    ax.set(xscale="log", xlabel="sampling steps K", ylabel="FID", title=f"ours ({r.profile} profile)")
    for label, fids in P.DDIM_TABLE1.items():
        ax_p.plot(P.DDIM_TABLE1_STEPS, fids, marker="o", label=label)
    ax_p.set(xscale="log", yscale="log", xlabel="sampling steps S", ylabel="FID",
             title="DDIM paper, Table 1 (CIFAR10, 50k samples)")
    for a in (ax, ax_p):
        a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def runs_table(runs: Dict[str, RunResult]) -> Table:
    """Every run: how its training ended and what each step of the entry cost here."""
    rows = []
    for name, r in runs.items():
        last = r.train.get("stats", {}).get("last") or {}
        ev_times = ", ".join(f"{e} {_f((m.get('run') or {}).get('elapsed_s_total'), 0)} s"
                             for e, m in r.evals.items())
        same = r.train.get("same_as")
        rows.append([name, r.outcome + (f" (reuses {same})" if same else ""), last.get("step", "?"),
                     _f(last.get("loss"), 4), _f(last.get("grad_norm"), 3),
                     "0 (reused)" if same else _f(r.train.get("elapsed_s_total",
                                                               r.train.get("elapsed_s_this_call")), 0),
                     ev_times or "none", r.train.get("note", "")])
    hw = sorted({(r.train.get("run_info") or {}).get("device_name", "?") for r in runs.values()})
    return {"title": "Runs: training outcome and wall time of each entry",
            "header": ["run", "status", "steps", "final loss", "grad norm", "train s", "evaluations (s)", "what"],
            "rows": rows,
            "notes": [f"hardware (per training process): {'; '.join(hw)}; on a CPU machine the runs go "
                      "in parallel, one per core",
                      "final loss: the last logged training-loss average: the eps MSE (L_simple), the mu-tilde MSE, "
                      "or for L runs the bound term L_{t-1} of a uniformly drawn t in bits/dim (T times it "
                      "estimates the bound); wall times include loading and, for training, the final "
                      "sample grid"]}


def floor_table(base: Path) -> Optional[Table]:
    """What real images score at this profile's FID/KID sample size (experiments.fid_floor)."""
    path = base / "fid_floor.json"
    if not path.exists():
        return None
    import json

    rows = [[f, _f(v["fid"]), _pm({"value": v["kid"], "std": v["kid_std"]}, 4), v["n"], v["n_reference"],
             v["real_images"]] for f, v in json.loads(path.read_text()).items()]
    return {"title": "The floor: FID / KID of real images at this evaluation size",
            "header": ["data", "FID", "KID", "N", "N reference", "real images"], "rows": rows,
            "notes": ["the same reference subset and Inception as the models' evaluations: a model's FID is read "
                      "against this, not against the paper's FID of 50,000 samples (FID is biased upwards at "
                      "small N; KID is unbiased)"]}


def samples_figure(runs: Dict[str, RunResult], base: Path, path: Path) -> Optional[Path]:
    """Each run's last training sample grid (EMA, the same noise for every run), side by side."""
    grids = [(n, base / n / "samples.png") for n, r in runs.items()
             if (base / n / "samples.png").exists() and not r.train.get("same_as")]
    if not grids:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, len(grids))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 2.6 * cols), 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, png) in zip(axes.flat, grids):
        ax.imshow(plt.imread(png), cmap="gray")
        r = runs[name]
        step = (r.train.get("stats", {}).get("last") or {}).get("step", "?")
        ax.set_title(f"{name}\n{r.status}, step {step}", fontsize=8)
    first = runs[grids[0][0]]
    T = ((first.train.get("config") or {}).get("diffusion") or {}).get("T", "?")
    fig.suptitle(f"Samples at the end of training ({first.profile} profile)\nEMA weights, T={T}-step "
                 "ancestral sampling, the same noise for every run", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.8 * rows + 0.4)))  # room for the two-line title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- rendering


def to_markdown(t: Table, level: int = 3) -> str:
    lines = [f"{'#' * level} {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
             "|" + "---|" * len(t["header"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    if t["notes"]:
        lines += [""] + [f"- {n}" for n in t["notes"]]
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("+-", r"$\pm$"), ("<=", r"$\leq$"), ("||", r"$\|$")):
        s = s.replace(a, b)
    return s


def to_latex(t: Table) -> str:
    cols = "l" * len(t["header"])
    lines = [f"% {t['title']}", r"\begin{tabular}{" + cols + "}", r"\toprule",
             " & ".join(_tex_escape(h) for h in t["header"]) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(str(c)) for c in row) + r" \\" for row in t["rows"]]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in t["notes"]]
    return "\n".join(lines) + "\n"


def rd_figure(runs: Dict[str, RunResult], base: Path, path: Path) -> Optional[Path]:
    """Fig. 5 as the evaluation draws it (ddpm.figures.rd_plots), the paper's Table 4 beside it:
    every step from the evaluation's rate_distortion.npz, else Table 4's rows from its metrics.json."""
    r = runs.get("eps_simple")
    rd = r.metric("rd") if r else None
    if not rd:
        return None
    import numpy as np

    from ddpm.figures import rd_plots

    keys = ("reverse_step", "rate_bpd", "distortion_rmse")
    folder = next(n for n, m in r.evals.items() if (m.get("results") or {}).get("rd") is rd)
    npz = base / r.name / folder / "rate_distortion.npz"
    if npz.is_file():
        with np.load(npz) as f:
            curve = {k: f[k] for k in keys}
    else:
        curve = {k: np.array([row[k] for row in rd["table4"]]) for k in keys}
    return rd_plots(curve, path, title=f"Rate-distortion, {r.scale()}", paper=P.TABLE4, label=f"ours ({r.profile})")


def write_report(results_dir, profile: str) -> List[Path]:
    runs = load_profile(results_dir, profile)
    base = Path(results_dir) / profile
    ts = tables(runs)
    floor = floor_table(base)
    if floor:
        ts.insert(3, floor)
    header = (f"# Results: {profile} profile\n\nRegenerated by `python -m analysis.report` from "
              f"results/{profile}/ (do not edit). " +
              ("" if profile == "paper" else
               f"**Scaled-down runs ({profile} profile): not the paper's setting; the paper's numbers "
               f"are shown for orientation only.**") + "\n\n")
    md = base / "tables.md"
    md.write_text(header + "\n".join(to_markdown(t) for t in ts))
    tex = base / "tables.tex"
    tex.write_text("\n".join(to_latex(t) for t in ts))
    written = [md, tex]
    fig = rd_figure(runs, base, base / "figures" / "rate_distortion_vs_paper.png")
    if fig:
        written.append(fig)
    fig = sampler_steps_figure(runs, base / "figures" / "fid_vs_sampler_steps.png")
    if fig:
        written.append(fig)
    fig = samples_figure(runs, base, base / "figures" / "samples_by_run.png")
    if fig:
        written.append(fig)
    readme = Path(results_dir) / "README.md"
    if readme.exists() and embed_block(readme, "tables", profile, "\n".join(to_markdown(t, level=4) for t in ts)):
        written.append(readme)
    return written


def embed_block(readme: Path, kind: str, profile: str, md: str) -> bool:
    """Replace what stands between ``<!-- KIND:PROFILE -->`` and ``<!-- /KIND:PROFILE -->`` in a
    hand-written report with regenerated text (the tables; analysis.claims: the claims), so its
    numbers never drift from results/. Returns whether the markers were there."""
    begin, end = f"<!-- {kind}:{profile} -->", f"<!-- /{kind}:{profile} -->"
    text = readme.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return False
    new = text[:i + len(begin)] + "\n" + md + "\n" + text[j:]
    if new != text:
        readme.write_text(new)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default="results")
    p.add_argument("--profile", default=None, help="default: every profile present")
    args = p.parse_args(argv)
    profiles = [args.profile] if args.profile else profiles_present(args.results_dir)
    if not profiles:
        print(f"no results under {args.results_dir}/ yet: run `bash run_all.sh` first")
        return 1
    for prof in profiles:
        for path in write_report(args.results_dir, prof):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
