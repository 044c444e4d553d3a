"""Every paper table row, ablation and figure, as data: a preset plus a few overrides.

Two layers:
- RUNS: training runs, each an ablation (overrides) on a dataset family, trained
  once and shared by every table that needs it (Table 1's rows are Table 2 cells).
- EXPERIMENTS: what the paper shows (a table, an ablation, a figure), each naming
  the runs it reads and the evaluations it needs from them.

A PROFILE turns a run into a concrete config and evaluation size:
- paper: the paper's settings (needs GPUs; days of compute for the whole grid);
- quick: scaled so the whole grid finishes on a 2-core CPU in about 2 hours (at most 3);
- smoke: every entry in a few minutes; run in CI.
What a scaled entry uses instead of the paper's data is in DATA_NOTES, and every
result records its profile, so a scaled number is never read as the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

PROFILES = ("paper", "quick", "smoke")
TABLE1_RUNS = ("eps_simple", "eps_vlb")  # Table 1's rows (L_simple and L), also cells of Table 2


@dataclass(frozen=True)
class Run:
    name: str
    family: str  # cifar10 | mnist | celebahq
    overrides: Dict[str, str] = field(default_factory=dict)  # config key -> value, over the profile's preset
    note: str = ""
    # a released model, evaluated as published instead of trained: the folder name of its
    # diffusers export, looked up in the released dir (experiments.run: --released-dir)
    released: Optional[str] = None


@dataclass(frozen=True)
class Eval:
    """One `python -m ddpm eval` call on a run's final EMA checkpoint."""

    name: str
    metrics: Tuple[str, ...]  # of fid, is, kid, nll, rd; () = the figures alone
    var: Optional[str] = None  # beta | beta_tilde; None = the variance the run was trained with
    figures: bool = False  # also draw Figs. 5-8
    # how the samples are drawn (ddpm.sampling.Sampler): the paper's ancestral sampler over all T
    # steps, or respaced DDPM / DDIM on `steps` of them (beyond the paper; never judged against it)
    sampler: str = "ancestral"
    steps: Optional[int] = None
    eta: float = 0.0
    # at most this many images per split for the bound (fewer than the profile's nll_n, where an
    # evaluation needs only a curve's shape from a slow network); None: the profile's
    max_nll_n: Optional[int] = None
    # the runs whose NLL also covers the train split. An evaluation is shared by name by every
    # experiment that reads it (Table 1's runs are Table 2 cells, evaluated once by "main"), so the
    # split is asked for by run: only Table 1 prints NLL test (train), and at the paper's scale the
    # train bound (50,000 images x T) costs as much as the 50,000 samples. Every other NLL: test.
    # So released_cifar10 (not a Table 1 run), the beta_tilde evaluation and mnist_seed get no NLL
    # train, at the paper profile either: nothing in analysis/ reads theirs.
    nll_train_runs: Tuple[str, ...] = ()

    def nll_splits(self, run: str, profile: str) -> Tuple[str, ...]:
        """The splits of this evaluation's NLL on ``run`` at ``profile``: test, and train for
        nll_train_runs where the profile evaluates the train split at all (EVAL_SIZE nll_train)."""
        return ("test", "train") if EVAL_SIZE[profile]["nll_train"] and run in self.nll_train_runs else ("test",)


@dataclass(frozen=True)
class Experiment:
    name: str
    paper: str  # where it is in the paper
    runs: Tuple[str, ...]
    evals: Tuple[Eval, ...]
    note: str = ""
    profiles: Tuple[str, ...] = ("paper", "quick", "smoke")  # where --all runs it


# Table 2: mean parameterization x objective. "MSE" is each parameterization's own
# unweighted MSE: ||mu-tilde - mu_theta||^2 for mu, ||eps - eps_theta||^2 (L_simple) for eps.
RUNS: Dict[str, Run] = {r.name: r for r in [
    Run("eps_simple", "cifar10", {}, "the paper's model: eps prediction, L_simple, sigma^2 = beta"),
    Run("eps_vlb", "cifar10", {"diffusion.loss_type": "vlb"},
        "eps prediction, true bound, fixed isotropic Sigma"),
    Run("eps_vlb_learned", "cifar10", {"diffusion.loss_type": "vlb", "diffusion.var_type": "learned"},
        "eps prediction, true bound, learned diagonal Sigma (paper: unstable)"),
    Run("mu_simple", "cifar10", {"diffusion.mean_type": "mu"},
        "mu prediction, ||mu-tilde - mu_theta||^2 (paper: unstable)"),
    Run("mu_vlb", "cifar10", {"diffusion.mean_type": "mu", "diffusion.loss_type": "vlb"},
        "mu prediction, true bound, fixed Sigma"),
    Run("mu_vlb_learned", "cifar10",
        {"diffusion.mean_type": "mu", "diffusion.loss_type": "vlb", "diffusion.var_type": "learned"},
        "mu prediction, true bound, learned diagonal Sigma"),
    Run("eps_simple_cosine", "cifar10", {"diffusion.schedule": "cosine"}, "schedule ablation: L_simple, cosine"),
    Run("eps_vlb_cosine", "cifar10", {"diffusion.schedule": "cosine", "diffusion.loss_type": "vlb"},
        "schedule ablation: true bound, cosine"),
    Run("mnist_seed", "mnist", {}, "the seed report's setting: MNIST, 10 epochs"),
    Run("cifar10_subset", "cifar10-subset", {}, "CPU profiles only: the L_simple model on the CIFAR10 subset, for "
        "Figs. 5-8 on natural images (the ablation grid runs on MNIST there)"),
    Run("celebahq", "celebahq", {}, "CelebA-HQ 256: samples and interpolation"),
    Run("released_cifar10", "cifar10", {}, "the paper's released CIFAR10 model (google/ddpm-cifar10-32, "
        "step 790000), evaluated as published: the fastest check against FID 3.17", released="ddpm-cifar10-32"),
]}

# Evaluations are shared by name: a run evaluated for two experiments is evaluated once.
# One evaluation process per run does samples and bound together (each process pays for
# loading the networks again).
MAIN = Eval("main", ("fid", "is", "kid", "nll", "rd"), nll_train_runs=TABLE1_RUNS)
MAIN_BT = Eval("beta_tilde", ("fid", "is", "kid", "nll"), "beta_tilde")
FIGURES = Eval("figures", (), figures=True)  # the figures alone
# rate-distortion (the test bound) and Figs. 5-8; the bound of a 32x32 RGB network on 32 images (about
# 15 min on one CPU core): Fig. 5's shape on natural images, not a number that decides anything
RD_FIGURES = Eval("rd_figures", ("rd",), figures=True, max_nll_n=32)
SAMPLER_STEPS = (10, 20, 50, 100, 1000)  # the DDIM paper's Table 1 columns (1000 = T: the same checkpoint as the rest)
FEW_STEPS = tuple(Eval(f"{kind}_{k}", ("fid", "kid"), sampler=kind, steps=k)
                  for kind in ("respaced", "ddim") for k in SAMPLER_STEPS)
EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment("table1", "Table 1 (CIFAR10: IS, FID, NLL test/train)", TABLE1_RUNS, (MAIN,)),
    Experiment("table2", "Table 2 (parameterization x objective, IS / FID)",
               ("mu_vlb_learned", "mu_vlb", "mu_simple", "eps_vlb_learned", "eps_vlb", "eps_simple"),
               (MAIN,), "run in every cell, including those the paper reports as unstable"),
    Experiment("variance", "Sec. 3.2 / 4.2: sigma^2 = beta vs beta-tilde, same checkpoints",
               ("eps_simple", "eps_vlb"), (MAIN, MAIN_BT)),
    Experiment("schedule", "Schedule ablation: linear vs cosine, for L_simple and for L",
               ("eps_simple", "eps_simple_cosine", "eps_vlb", "eps_vlb_cosine"), (MAIN,),
               "cosine is Nichol & Dhariwal 2021, not in the paper; not in the quick profile (none of the "
               "paper's claims, and no time left in its 2.5 hours)", profiles=("paper", "smoke")),
    Experiment("rate_distortion", "Table 4 and Fig. 5 (rate-distortion, CIFAR10 test)", ("eps_simple",), (MAIN,)),
    Experiment("progressive", "Figs. 6-8 (progressive generation, shared x_t, interpolation)", ("eps_simple",),
               (FIGURES,)),
    Experiment("mnist", "The seed report: MNIST samples after 10 epochs", ("mnist_seed",), (MAIN, FIGURES)),
    Experiment("celebahq", "CelebA-HQ 256 samples (Fig. 1) and interpolation (Fig. 8)", ("celebahq",),
               (FIGURES,), profiles=("paper",)),
    Experiment("cifar10_subset", "Figs. 5-8 on the CIFAR10 subset: rate-distortion, progressive generation, "
               "shared x_t, interpolation (CPU profiles, where the grid runs on MNIST)", ("cifar10_subset",),
               (RD_FIGURES,), "no CelebA-HQ and no time for full CIFAR10 on a CPU: natural images at small "
               "scale, for the figures' shapes only", profiles=("quick", "smoke")),
    Experiment("released", "Table 1's L_simple row from the released weights (FID 3.17, IS 9.46, NLL 3.75): "
               "hours of sampling instead of days of training", ("released_cifar10",), (MAIN,),
               "needs the diffusers export of google/ddpm-cifar10-32 in the released dir; paper protocol only "
               "(a 35.7M-parameter model: not for CPU profiles)", profiles=("paper",)),
    Experiment("sampler_steps", "Beyond the paper: FID/KID against the number of sampling steps K, respaced "
               "DDPM and DDIM (eta = 0), beside the DDIM paper's Table 1", ("eps_simple",), (MAIN,) + FEW_STEPS,
               "K = T is the main evaluation's ancestral sampler; a K above the profile's T is not run; not in "
               "the quick profile (none of the paper's claims; its reading at the earlier quick scale is in git "
               "history, commit b4b8006)", profiles=("paper", "smoke")),
]}

# The preset each profile trains a run of each family with: every size lives in the preset
# (ddpm/config.py); a run adds only its ablation's overrides. At the CPU profiles the CIFAR10
# grid (Tables 1-2, variance, rate-distortion, Figs. 6-7) runs on MNIST: measured, the CIFAR10
# subset cannot rank models in a CPU budget (results/quick/recipe_search.md, section 3); the
# cifar10-subset family keeps one CIFAR10 model for the figures.
PROFILE_PRESET: Dict[Tuple[str, str], str] = {
    ("paper", "cifar10"): "cifar10",
    ("paper", "mnist"): "mnist",
    ("paper", "celebahq"): "celebahq256",
    ("paper", "cifar10-subset"): "cifar10",  # not run at the paper profile (eps_simple is the same)
    ("quick", "cifar10"): "quick-grid",
    ("quick", "mnist"): "quick-mnist",
    ("quick", "cifar10-subset"): "quick-cifar10",
    ("quick", "celebahq"): "quick-cifar10",  # no CelebA-HQ here: the CIFAR10 subset stands in
    ("smoke", "cifar10"): "smoke-mnist",
    ("smoke", "mnist"): "smoke-mnist",
    ("smoke", "cifar10-subset"): "smoke-cifar10",
    ("smoke", "celebahq"): "smoke-cifar10",
}

# How a profile evaluates: samples for FID/KID/IS (n), images per split for the bound over all
# T steps (nll_n; None = the whole split: 10k test, 50k train), whether the bound runs on the
# train split too where an evaluation asks for it (nll_train; Eval.nll_splits: Table 1's runs;
# every NLL is on test), the FID/KID reference set (its split and size: the paper's 50k training
# images; at the quick profile N test images, so that N samples are read against the floor of N
# real training images), the sampling batch, and bf16 autocast for sampling (never for the bound).
EVAL_SIZE: Dict[str, Dict[str, object]] = {
    "paper": {"n": 50_000, "nll_n": None, "nll_train": True, "ref_split": "train", "ref_n": None,
              "batch": 256, "bf16": False},
    "quick": {"n": 500, "nll_n": 200, "nll_train": False, "ref_split": "test", "ref_n": 500,
              "batch": 100, "bf16": True},
    "smoke": {"n": 8, "nll_n": 2, "nll_train": False, "ref_split": "test", "ref_n": 32,
              "batch": 256, "bf16": True},
}

# Runs that need less than the profile's evaluation there: at the quick profile, the Table 2 cells
# outside Table 1 are read for stability and a KID beside the eps / L_simple cell's (N = 200, no
# bound), the seed report's model for its FID at N = 500 (no bound), and the CIFAR10-subset model for
# the shape of Fig. 5 (16 images). Measured: the quick run must end in 2.5 h on 2 CPU cores that
# give about 1.3x one core when both are busy (results/quick/recipe_search.md, section 6).
SMALLER_EVAL: Dict[Tuple[str, str], Dict[str, object]] = {
    **{("quick", r): {"n": 200, "without": ("nll", "rd")}
       for r in ("mu_vlb_learned", "mu_vlb", "mu_simple", "eps_vlb_learned")},
    ("quick", "mnist_seed"): {"without": ("nll", "rd")},
    ("quick", "cifar10_subset"): {"nll_n": 16},
}


def eval_size(run: str, ev: Eval, profile: str) -> Tuple[int, Tuple[str, ...], Optional[int]]:
    """(samples, metrics, bound images per split; None = the whole split) of evaluation ``ev`` of
    run ``run`` at ``profile``: the profile's EVAL_SIZE, the evaluation's own cap, SMALLER_EVAL."""
    size, small = EVAL_SIZE[profile], SMALLER_EVAL.get((profile, run), {})
    nll_n = min((v for v in (size["nll_n"], ev.max_nll_n, small.get("nll_n")) if v is not None), default=None)
    metrics = tuple(m for m in ev.metrics if m not in small.get("without", ()))
    return small.get("n", size["n"]), metrics, nll_n


# For the plan that run_all.sh prints before it starts: seconds per network call (one image; a
# training image counts 3) and per stage (start-up, data, Inception), with two 1-thread processes
# on this project's 2-core CPU, as last measured (quick: the run of 30 Nov 2026 in results/quick;
# smoke: the CI test). None: not measured (paper: GPU days; --plan times the GPUs).
EST_SECONDS: Dict[str, Optional[Dict[str, float]]] = {
    "paper": None,
    "quick": {"per_call": 0.00125, "per_stage": 110.0},
    "smoke": {"per_call": 0.002, "per_stage": 6.0},
}

DATA_NOTES = {
    ("quick", "cifar10"): "MNIST stands in for CIFAR10 at this profile: the ablation grid needs models that can "
                          "be ranked in a CPU budget, which the CIFAR10 subset is not (measured, "
                          "results/quick/recipe_search.md section 3)",
    ("smoke", "cifar10"): "MNIST stands in for CIFAR10 at this profile (as at quick)",
    ("quick", "cifar10-subset"): "CIFAR10 subset 'partial': training images 0..3999 (from full CIFAR10 or its "
                                 "PNG export in ../shared/data/cifar10-partial); test-set bound on the test "
                                 "images of 4 classes",
    ("quick", "celebahq"): "no CelebA-HQ here: the CIFAR10 subset (32x32) stands in; the entry shows the "
                           "pipeline (samples, interpolation), not CelebA-HQ results",
    ("smoke", "celebahq"): "no CelebA-HQ here: the CIFAR10 subset (32x32) stands in",
}

# GPUs a training run of a family gets at a profile, when the machine has them (experiments.run
# launches it over torchrun; --gpus-per-run overrides this). CelebA-HQ 256: 497 GFLOP per image
# per forward against CIFAR10's 12.4 (torch's FlopCounterMode), 12x CIFAR10's whole training at
# the paper's batch and steps (the paper trained both on a TPU v3-8). Any other run: one GPU.
GPUS_PER_RUN: Dict[Tuple[str, str], int] = {
    ("paper", "celebahq"): 8,
}


def run_config_args(run: Run, profile: str) -> Tuple[str, List[str]]:
    """(preset, --set overrides) for a run at a profile. Profile overrides come first so
    the ablation's own overrides always win."""
    return PROFILE_PRESET[(profile, run.family)], [f"{k}={v}" for k, v in run.overrides.items()]


def experiments_for(profile: str) -> List[str]:
    """The experiments --all runs at ``profile``."""
    return [n for n, e in EXPERIMENTS.items() if profile in e.profiles]


def runs_for(experiments) -> List[str]:
    seen: List[str] = []
    for e in experiments:
        for r in EXPERIMENTS[e].runs:
            if r not in seen:
                seen.append(r)
    return seen
