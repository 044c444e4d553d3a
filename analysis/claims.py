"""The paper's claims C1-C7, each decided from results/ by a rule written down before the runs.

    python -m analysis.claims --profile quick     # -> results/quick/claims.md (+ claims.json)

The rules (results/quick/recipe_search.md, section 4, written before the quick run; C5's
before it too, here), for two models A and B evaluated the same way (same N, reference
subset, sampler, seed):
- sample quality: A is better when KID_B - KID_A > 2 sqrt(SE_A^2 + SE_B^2) (KID: unbiased
  MMD^2 on the whole sets, jackknife SEs). FID is shown beside it with its bootstrap SE and
  the floor of real images at the same N; FID alone decides nothing at N <= 500.
- NLL: A is better when the mean paired difference over the same test images (same noise
  seed) exceeds 2 SE of the paired difference. A paired SE above 0.025 bits/dim cannot
  resolve the paper's gap of 0.05: said so.
- C3, a Table 2 cell is unstable if its training stopped on a non-finite loss, or its
  gradient norm rose above 10x its median after warm-up, or its samples collapsed (KID above
  10x the eps / L_simple cell's, or the per-pixel std across the sample set below 5% of the
  real images'). Otherwise it is "stable at this budget", which does not refute the paper's
  unstable cells (long runs of a large model).
- C4: beta and beta-tilde give similar samples if their KIDs do not differ by the rule, and
  different NLL if the paired NLL rule separates them.
- C5: "most of the rate in the last reverse steps" holds if more than half of the rate is sent
  in the last 10% of reverse steps (the paper's Table 4: 93%); the distortion at 0.9T and at the
  end is shown beside the paper's.
- C7: met if the MNIST model's FID <= 35 at N = 500 (1000 steps, EMA).
A verdict is one of: consistent (with the paper), contradicted, undecided, or not run. Nothing
is tuned toward the paper's answer: the rule decides.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import paper as P
from .report import embed_block
from .results import RunResult, load_profile

Claim = Dict[str, Any]  # id, claim, paper, ours, verdict, where

GRAD_RISE = 10.0  # C3: gradient-norm rise over its post-warm-up median that counts as unstable
KID_COLLAPSE = 10.0  # C3: KID above this multiple of the eps / L_simple cell's
STD_COLLAPSE = 0.05  # C3: per-pixel std across samples below this fraction of the real images'
NLL_SE_RESOLVES = 0.025  # a paired NLL SE above this cannot resolve the paper's 0.05 gap
C7_FID = 35.0


def _fmt(x: Optional[float], d: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}g}"


def kid_of(r: Optional[RunResult], ev: str = "main") -> Optional[Dict[str, Any]]:
    m = r.metric("kid", ev) if r else None
    if not m or m.get("value") is None:
        return None
    # the whole-set unbiased estimate and its jackknife SE; at N <= 1000 equal to the value
    unbiased = m.get("unbiased")  # None above fidelity.JACKKNIFE_MAX images (the paper's N): the value
    return {"kid": m["value"] if unbiased is None else unbiased, "se": m.get("se"), "n": m.get("n")}


def compare_kid(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """(KID_B - KID_A, its 2-SE threshold, which is better: 'A', 'B' or None)."""
    diff = b["kid"] - a["kid"]
    if a["se"] is None or b["se"] is None:
        return {"diff": diff, "threshold": None, "better": None}
    thr = 2 * math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    return {"diff": diff, "threshold": thr, "better": "A" if diff > thr else "B" if -diff > thr else None}


def paired_nll(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Mean and SE of NLL_A - NLL_B over the same images (None if not comparable image by image)."""
    if not a or not b or not a.get("per_image_bpd") or not b.get("per_image_bpd"):
        return None
    if a.get("data") != b.get("data") or a.get("seed") != b.get("seed") or \
            len(a["per_image_bpd"]) != len(b["per_image_bpd"]):
        return None
    d = [x - y for x, y in zip(a["per_image_bpd"], b["per_image_bpd"])]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    better = "A" if mean < -2 * se else "B" if mean > 2 * se else None
    return {"mean": mean, "se": se, "n": n, "better": better, "resolves_paper_gap": se <= NLL_SE_RESOLVES}


def _kid_str(k: Optional[Dict[str, Any]]) -> str:
    return "not run" if k is None else f"KID {_fmt(k['kid'])} +- {_fmt(k['se'], 2)}"


def _fid_str(r: Optional[RunResult], ev: str = "main") -> str:
    m = r.metric("fid", ev) if r else None
    if not m or m.get("value") is None:
        return "FID not run"
    return f"FID {m['value']:.1f}" + (f" +- {m['se']:.1f}" if m.get("se") is not None else "")


def _nll_str(r: Optional[RunResult], ev: str = "main") -> str:
    m = r.metric("nll_test", ev) if r else None
    if not m or m.get("value") is None:
        return "NLL not run"
    return f"NLL {m['value']:.3f} +- {m['se']:.3f}"


def _floor(base: Path) -> Dict[str, Any]:
    p = base / "fid_floor.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _floor_str(floor: Dict[str, Any], family: str) -> str:
    f = floor.get(family)
    if not f:
        return "floor not measured"
    return (f"floor (real images, N={f['n']}): FID {f['fid']:.1f}"
            + (f" +- {f['fid_se']:.1f}" if f.get("fid_se") is not None else ""))


def _ready(r: Optional[RunResult]) -> bool:
    return r is not None and r.status == "finished"


def c1(runs, floor) -> Claim:
    a, b = runs.get("eps_simple"), runs.get("eps_vlb")
    ka, kb = kid_of(a), kid_of(b)
    claim = {"id": "C1", "claim": "L_simple gives better samples than the true bound L (fixed Sigma)",
             "paper": "FID 3.17 vs 13.51 (Table 1)", "where": "tables.md: Table 1, Table 2"}
    if not (ka and kb):
        return {**claim, "ours": "not run", "verdict": "not run"}
    c = compare_kid(ka, kb)
    ours = (f"L_simple {_kid_str(ka)}, {_fid_str(a)}; L {_kid_str(kb)}, {_fid_str(b)}; N={ka['n']}; "
            f"{_floor_str(floor, a.train.get('family', 'cifar10'))}; difference {_fmt(c['diff'])} vs 2 SE "
            f"{_fmt(c['threshold'])}")
    verdict = {"A": "consistent", "B": "contradicted", None: "undecided"}[c["better"]]
    return {**claim, "ours": ours, "verdict": verdict}


def c2(runs) -> Claim:
    a, b = runs.get("eps_vlb"), runs.get("eps_simple")
    claim = {"id": "C2", "claim": "the true bound L gives the better NLL than L_simple",
             "paper": "3.70 vs 3.75 bits/dim (Table 1)", "where": "tables.md: Table 1"}
    p = paired_nll(a.metric("nll_test") if a else None, b.metric("nll_test") if b else None)
    if p is None:
        return {**claim, "ours": "not run (or not on the same images)", "verdict": "not run"}
    ours = (f"L {_nll_str(a)}, L_simple {_nll_str(b)}; paired difference L - L_simple "
            f"{p['mean']:+.4f} +- {p['se']:.4f} over {p['n']} test images")
    verdict = {"A": "consistent", "B": "contradicted", None: "undecided"}[p["better"]]
    if not p["resolves_paper_gap"]:
        ours += f" (paired SE above {NLL_SE_RESOLVES}: cannot resolve a gap of the paper's size)"
    return {**claim, "ours": ours, "verdict": verdict}


def read_stats(base: Path, name: str) -> List[Dict[str, Any]]:
    p = base / name / "stats.jsonl"
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def stability(r: Optional[RunResult], base: Path, ref_kid: Optional[float]) -> Dict[str, Any]:
    """C3's verdict on one Table 2 cell: unstable (and why) or stable at this budget."""
    if r is None:
        return {"verdict": "not run", "why": ""}
    if r.status == "diverged":
        return {"verdict": "unstable", "why": "training stopped on a non-finite loss"}
    if r.status != "finished":
        return {"verdict": "not run", "why": r.outcome}
    why = []
    warmup = ((r.train.get("config") or {}).get("train") or {}).get("warmup", 0)
    norms = [s["grad_norm"] for s in read_stats(base, r.name)
             if isinstance(s.get("grad_norm"), (int, float)) and s.get("step", 0) > warmup]
    if norms:
        med = sorted(norms)[len(norms) // 2]
        if med > 0 and max(norms) > GRAD_RISE * med:
            why.append(f"gradient norm rose to {max(norms):.3g}, {max(norms) / med:.0f}x its median {med:.3g}")
    k = kid_of(r)
    if k and ref_kid and ref_kid > 0 and k["kid"] > KID_COLLAPSE * ref_kid:
        why.append(f"KID {k['kid']:.3g} > {KID_COLLAPSE:.0f}x the eps / L_simple cell's {ref_kid:.3g}")
    s = (r.metric("sampling") or {})
    std, ref_std = s.get("pixel_std_across_set"), s.get("reference_pixel_std_across_set")
    if std is not None and ref_std and std < STD_COLLAPSE * ref_std:
        why.append(f"samples collapsed: pixel std across the set {std:.2f} vs {ref_std:.2f} for real images")
    return {"verdict": "unstable" if why else "stable", "why": "; ".join(why)}


def c3(runs, base) -> Claim:
    ref = kid_of(runs.get("eps_simple"))
    cells, stable_here, unstable_here, missing = [], [], [], []
    for name in P.TABLE2_RUNS.values():
        st = stability(runs.get(name), base, ref and ref["kid"])
        paper_stable = P.TABLE2[name] is not None
        if st["verdict"] == "not run":
            missing.append(name)
        elif st["verdict"] == "stable" and not paper_stable:
            stable_here.append(name)
        elif st["verdict"] == "unstable" and paper_stable:
            unstable_here.append(name)
        k = kid_of(runs.get(name))
        cells.append(f"{name}: {st['verdict']}" + (f" ({st['why']})" if st["why"] else "")
                     + (f", {_kid_str(k)}" if k else "") + f" [paper: {'stable' if paper_stable else 'unstable'}]")
    claim = {"id": "C3", "claim": "Table 2: mu prediction works only with the true bound (mu + MSE unstable); "
                                  "eps works with fixed Sigma; eps + learned Sigma unstable",
             "paper": "unstable: mu + MSE, eps + learned Sigma (Table 2)",
             "where": "tables.md: Table 2; figures/training_curves.png", "ours": "; ".join(cells)}
    if len(missing) == len(cells):
        verdict = "not run"
    elif unstable_here:  # a cell the paper trained to a number failed here: against the paper
        verdict = f"contradicted ({', '.join(unstable_here)} unstable here)"
    elif stable_here:  # short runs of a small model: not a refutation of the paper's long runs
        verdict = (f"not reproduced at this budget ({', '.join(stable_here)} stable here; the paper's "
                   "instability appeared in long runs of a large model)")
    else:
        verdict = "consistent" + (f" ({', '.join(missing)} not run)" if missing else "")
    return {**claim, "verdict": verdict}


def c4(runs) -> Claim:
    parts, verdicts = [], []
    for name, label in (("eps_simple", "L_simple"), ("eps_vlb", "L")):
        r = runs.get(name)
        kb, kt = kid_of(r, "main"), kid_of(r, "beta_tilde")
        if not (kb and kt):
            continue
        c = compare_kid(kb, kt)
        p = paired_nll(r.metric("nll_test", "main"), r.metric("nll_test", "beta_tilde"))
        similar = c["better"] is None
        different_nll = p is not None and p["better"] is not None
        verdicts.append(similar and different_nll)
        parts.append(f"{label}: beta {_kid_str(kb)}, beta-tilde {_kid_str(kt)} ("
                     + ("similar" if similar else f"differ: {'beta' if c['better'] == 'A' else 'beta-tilde'} better")
                     + "); NLL beta - beta-tilde " + (f"{p['mean']:+.4f} +- {p['se']:.4f}" if p else "n/a")
                     + (" (different)" if different_nll else " (not separated)"))
    claim = {"id": "C4", "claim": "sigma^2 = beta and beta-tilde give similar sample quality, different NLL",
             "paper": "Sec. 4.2 (similar samples); NLL differs", "where": "tables.md: Variance"}
    if not parts:
        return {**claim, "ours": "not run", "verdict": "not run"}
    verdict = "consistent" if all(verdicts) else "partly consistent" if any(verdicts) else "not reproduced"
    return {**claim, "ours": "; ".join(parts), "verdict": verdict}


def rd_shares(rows: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    by = {row["reverse_step"]: row for row in rows}
    if not by:
        return None
    T = max(by)
    s9 = round(0.9 * T)
    if s9 not in by:
        return None
    total = by[T]["rate_bpd"]
    return {"share_last_10pct": 1 - by[s9]["rate_bpd"] / total if total > 0 else float("nan"),
            "dist_at_0.9T": by[s9]["distortion_rmse"], "dist_at_T": by[T]["distortion_rmse"], "rate": total}


def c5(runs) -> Claim:
    claim = {"id": "C5", "claim": "rate-distortion: most of the rate is spent in the last reverse steps, "
                                  "on imperceptible distortion",
             "where": "tables.md: Table 4; figures/rate_distortion_vs_paper.png"}
    paper_rows = [{"reverse_step": s, "rate_bpd": v[0], "distortion_rmse": v[1]} for s, v in P.TABLE4.items()]
    ps = rd_shares(paper_rows)
    claim["paper"] = (f"{100 * ps['share_last_10pct']:.0f}% of {ps['rate']:.2f} bits/dim in the last 10% of "
                      f"steps; RMSE {ps['dist_at_0.9T']:.1f} at 0.9T, {ps['dist_at_T']:.2f} at the end")
    r = runs.get("eps_simple")
    rd = r.metric("rd") if r else None
    ours = rd_shares(rd["table4"]) if rd else None
    if not ours:
        return {**claim, "ours": "not run", "verdict": "not run"}
    text = (f"{100 * ours['share_last_10pct']:.0f}% of {ours['rate']:.2f} bits/dim in the last 10% of steps; "
            f"RMSE {ours['dist_at_0.9T']:.1f} at 0.9T, {ours['dist_at_T']:.2f} at the end (eps_simple, "
            f"{rd.get('n')} test images)")
    return {**claim, "ours": text, "verdict": "consistent" if ours["share_last_10pct"] > 0.5 else "contradicted"}


def c6(runs, base) -> Claim:
    figs = []
    for name in ("eps_simple", "cifar10_subset", "mnist_seed"):
        r = runs.get(name)
        for ev, m in (r.evals.items() if r else []):
            for key in ("fig6_progressive", "fig7_shared_latent"):
                if key in (m.get("figures") or {}):
                    figs.append(f"{name}/{ev}/{key}.png")
    claim = {"id": "C6", "claim": "progressive generation: coarse features first (Fig. 6); a shared x_t keeps "
                                  "high-level attributes (Fig. 7)", "paper": "Figs. 6-7 (qualitative)"}
    if not figs:
        return {**claim, "ours": "not run", "verdict": "not run", "where": ""}
    return {**claim, "ours": "figures drawn; judged by eye, no number", "verdict": "qualitative: see the figures",
            "where": ", ".join(figs)}


def c7(runs, floor) -> Claim:
    r = runs.get("mnist_seed")
    m = r.metric("fid") if r else None
    claim = {"id": "C7", "claim": "the seed report's setting: MNIST, 10 epochs, recognizable digits",
             "paper": f"target here: FID <= {C7_FID:.0f} at N = 500 (1000 steps, EMA)",
             "where": "tables.md: MNIST; mnist_seed/figures/samples_grid.png"}
    if not m or m.get("value") is None:
        return {**claim, "ours": "not run", "verdict": "not run"}
    k = kid_of(r)
    ours = f"{_fid_str(r)}, {_kid_str(k)}, N={m.get('n')}; {_floor_str(floor, 'mnist')}"
    return {**claim, "ours": ours, "verdict": "met" if m["value"] <= C7_FID else "not met"}


def claims(results_dir, profile: str) -> List[Claim]:
    base = Path(results_dir) / profile
    runs = load_profile(results_dir, profile)
    floor = _floor(base)
    return [c1(runs, floor), c2(runs), c3(runs, base), c4(runs), c5(runs), c6(runs, base), c7(runs, floor)]


def to_markdown(cs: List[Claim], profile: str) -> str:
    lines = [f"Claims decided at the **{profile}** profile by the rules in `analysis/claims.py` "
             "(written before the runs); regenerated by `python -m analysis.claims` (do not edit).", "",
             "| # | claim | paper | ours (N, uncertainty) | verdict | shown in |", "|---|---|---|---|---|---|"]
    for c in cs:
        cells = [c["id"], c["claim"], c["paper"], c["ours"], f"**{c['verdict']}**", c.get("where", "")]
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    return "\n".join(lines) + "\n"


def training_curves(results_dir, profile: str, path: Path) -> Optional[Path]:
    """C3's evidence: loss and gradient norm of every Table 2 cell against the step."""
    base = Path(results_dir) / profile
    curves = {n: read_stats(base, n) for n in P.TABLE2}
    curves = {n: [s for s in c if isinstance(s.get("loss"), (int, float))] for n, c in curves.items()}
    curves = {n: c for n, c in curves.items() if c}
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, c in curves.items():
        steps = [s["step"] for s in c]
        axes[0].plot(steps, [s["loss"] for s in c], label=n, lw=1)
        axes[1].plot(steps, [s["grad_norm"] for s in c], label=n, lw=1)
    for ax, what in zip(axes, ("training loss (own objective; scales differ)", "gradient norm (before clipping)")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(what, fontsize=9)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Table 2 cells, {profile} profile: mean over each logging window", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_claims(results_dir, profile: str) -> List[Path]:
    base = Path(results_dir) / profile
    cs = claims(results_dir, profile)
    md = to_markdown(cs, profile)
    (base / "claims.md").write_text(f"# Claims: {profile} profile\n\n" + md)
    (base / "claims.json").write_text(json.dumps(cs, indent=2) + "\n")
    out = [base / "claims.md", base / "claims.json"]
    fig = training_curves(results_dir, profile, base / "figures" / "training_curves.png")
    if fig:
        out.append(fig)
    readme = Path(results_dir) / "README.md"
    if readme.exists() and embed_block(readme, "claims", profile, md):
        out.append(readme)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default="results")
    p.add_argument("--profile", default="quick")
    args = p.parse_args(argv)
    if not (Path(args.results_dir) / args.profile).is_dir():
        print(f"no results under {args.results_dir}/{args.profile}/ yet: run `bash run_all.sh` first")
        return 1
    for path in write_claims(args.results_dir, args.profile):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
