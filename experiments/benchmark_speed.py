"""Speed of our UNet against diffusers' UNet2DModel in the same configuration.

Measures, in one run on one machine, for each variant (fp32, bf16 autocast,
channels_last, torch.compile and their combinations):
  - training throughput (images/s) of one full training step: ddpm.train.optimisation_step
    itself (q_sample + forward + L_simple, backward, grad-norm clip, the non-finite check,
    Adam at the paper's lr 2e-4, EMA update), on a fixed batch (no data loading);
  - 1000-step ancestral sampling throughput (images/s): ours through ddpm.sampling.sample
    (Algorithm 2; at a +compile variant its compiled step: network and update in one graph,
    CUDA graphs on CUDA), diffusers' through its DDPMScheduler loop as DDPMPipeline runs it.
    Only --steps steps are timed and the time is extrapolated to 1000 (every step runs
    the same network on the same shapes); the output says so;
  - achieved FLOP/s of the training step (FLOPs counted by
    torch.utils.flop_counter.FlopCounterMode: convolutions, matmuls, attention) against
    this machine's matmul peak, measured here with a large torch.matmul in fp32 and bf16;
  - peak memory of one training step and one sampling step, above what was allocated
    before it (CPU: the process's VmHWM from /proc/self/status, reset through
    /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated).
Ours and diffusers' get identical weights (through ddpm.official's name map) and the
script checks that they compute the same function before timing anything.

Timings on a shared machine are noisy: every number is the median of --repeats
measurements, and ours and diffusers' are measured alternately so that load changes
hit both. Results can be written as JSON (--out) for analysis/.

    python experiments/benchmark_speed.py --model small --batch 8
    python experiments/benchmark_speed.py --model cifar10 --batch 8 --variants fp32,bf16
    python experiments/benchmark_speed.py --device cuda --batch 128 --variants fp32,bf16,bf16+cl+compile
diffusers is optional: without it only our UNet is measured and the ratios are n/a.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must not reach for the hub

from ddpm import official  # noqa: E402
from ddpm.config import build_diffusion, build_model, get_preset  # noqa: E402
from ddpm.runtime import device_description  # noqa: E402
from ddpm.sampling import sample  # noqa: E402
from ddpm.train import TrainState, make_optimizer, optimisation_step  # noqa: E402
from ddpm.unet import num_params  # noqa: E402

# Network sizes: the paper's CIFAR10 model, and a ~1.1M-parameter one of the same
# family (32x32 RGB, attention at 16x16) for slow machines.
MODELS = {
    "cifar10": [],
    "small": ["model.ch=32", "model.ch_mult=1,2,2", "model.num_res_blocks=1"],
}
PAPER = "paper: 21 training steps/s at batch 128 = 2688 images/s on a TPU v3-8 (Appendix B)"


@dataclass(frozen=True)
class Variant:
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = set(name.split("+")) - {"fp32"}
        unknown = parts - {"bf16", "cl", "compile"}
        if unknown:
            raise SystemExit(f"unknown variant part(s) {sorted(unknown)} in {name!r}; "
                             "use fp32, bf16, cl, compile joined by '+', e.g. bf16+cl")
        return cls("bf16" in parts, "cl" in parts, "compile" in parts)

    @property
    def name(self) -> str:
        parts = [p for p, on in (("bf16", self.bf16), ("cl", self.channels_last), ("compile", self.compile)) if on]
        return "+".join(parts) or "fp32"


# ------------------------------------------------------------------- machine measures


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Wall-clock seconds of fn()."""
    return timed2(fn, device)[0]


def timed2(fn, device):
    """(wall-clock, this process's CPU) seconds of fn(). On a shared CPU the CPU time is
    the less load-sensitive of the two when torch runs one thread (--threads 1)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def matmul_peak(device, dtype, repeats) -> float:
    """FLOP/s of a large square matmul: the practical peak the model's FLOPs are held against.
    The best of ``repeats`` runs: a peak is what the machine can do when nothing interferes."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(2):  # warm-up (kernel selection, clocks)
        a @ b
    return 2 * n ** 3 / min(timed(lambda: a @ b, device) for _ in range(repeats))


class PeakMemory:
    """Peak memory of a block above what was in use when it started, in bytes."""

    def __init__(self, device):
        self.device = device
        if device.type == "cpu":
            try:  # Linux: writing 5 resets the "hiwater" resident set size (man 5 proc)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError as e:
                self.error = f"cannot reset the peak RSS ({e}); memory not measured"
            else:
                self.error = None
            self.libc = ctypes.CDLL(ctypes.util.find_library("c"))

    @staticmethod
    def _status_kib(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {key}")

    def measure(self, fn) -> float:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        if self.error:
            return float("nan")
        # Return freed heap memory to the system first; glibc would otherwise keep what
        # the warm-up freed, and the step would reuse it without raising the RSS.
        gc.collect()
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = self._status_kib("VmRSS")
        fn()
        return (self._status_kib("VmHWM") - before) * 1024


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------ the two nets


def build_pair(cfg, device, use_diffusers: bool):
    """Our UNet and, if available, diffusers' UNet2DModel with the same weights."""
    torch.manual_seed(0)
    ours = build_model(cfg)
    nets = {"ours": (ours, lambda m: m)}
    if use_diffusers:
        from diffusers import UNet2DModel

        theirs = UNet2DModel(**official.diffusers_config(cfg))
        sd = official.to_diffusers_state_dict(ours.state_dict(), cfg)
        theirs.load_state_dict(sd)
        nets["diffusers"] = (theirs, lambda m: (lambda x, t: m(x, t).sample))
    return {k: (m.to(device), wrap) for k, (m, wrap) in nets.items()}


def check_same_function(nets, cfg, device):
    """(max |ours - diffusers| on ``device``, max |ours on device - ours on CPU|), in fp32
    with TF32 off, on random inputs and with every parameter perturbed (the
    zero-initialized output layers would otherwise make every output zero). nan where
    not applicable (no diffusers; device is the CPU)."""
    ours = nets["ours"][0]
    g = torch.Generator().manual_seed(0)
    R, C = cfg.data.resolution, cfg.data.channels
    x = torch.randn(2, C, R, R, generator=g)
    t = torch.tensor([3, 900])
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    vs_diffusers = vs_cpu = float("nan")
    with torch.no_grad():
        saved = {k: v.clone() for k, v in ours.state_dict().items()}
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(device))
        ours.eval()
        y = ours(x.to(device), t.to(device))
        if "diffusers" in nets:
            theirs = nets["diffusers"][0].eval()
            theirs.load_state_dict(official.to_diffusers_state_dict(ours.state_dict(), cfg))
            vs_diffusers = (y - theirs(x.to(device), t.to(device)).sample).abs().max().item()
            theirs.load_state_dict(official.to_diffusers_state_dict(saved, cfg))
        if device.type != "cpu":
            on_cpu = copy.deepcopy(ours).cpu()
            vs_cpu = (y.cpu() - on_cpu(x, t)).abs().max().item()
        ours.load_state_dict(saved)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return vs_diffusers, vs_cpu


def autocast_fp32(fn, device, bf16: bool):
    """``fn(x, t)`` under bf16 autocast if ``bf16``, returning float32."""
    def net(x, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(x, t).float()
    return net


class Runner:
    """One implementation under one variant: a training step and a sampling chunk."""

    def __init__(self, name, model, wrap, variant, cfg, device, batch, sample_batch, steps, train_chunk=1):
        self.name, self.variant, self.device, self.batch = name, variant, device, batch
        self.train_chunk = train_chunk
        self.sample_batch, self.steps = sample_batch, steps
        self.model = model
        fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        self.fmt = fmt
        self.eager_fn = wrap(model)
        self.fn = wrap(torch.compile(model)) if variant.compile else self.eager_fn
        self.diffusion = build_diffusion(cfg)
        self.shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        # The paper's recipe (Adam, clipping, EMA decay 0.9999) at its full lr: no warm-up.
        self.tc = replace(cfg.train, bf16=variant.bf16, warmup=0)
        g = torch.Generator(device=device).manual_seed(0)
        self.state = TrainState(model, copy.deepcopy(model).eval().requires_grad_(False),
                                make_optimizer(model, self.tc, device), gen=g)
        self.x0 = (torch.rand((batch, *self.shape), generator=g, device=device) * 2 - 1).contiguous(memory_format=fmt)
        self.t = torch.randint(0, self.diffusion.T, (batch,), generator=g, device=device)
        self.noise = torch.randn(self.x0.shape, generator=g, device=device).contiguous(memory_format=fmt)
        self.x_T = torch.randn((sample_batch, *self.shape), generator=g, device=device).contiguous(memory_format=fmt)
        self.gen = g
        # the network under this variant's autocast, returning float32 for the sampler math; ours
        # samples with the eager one (sample(compile=True) compiles the whole step itself)
        self.forward_fp32 = autocast_fp32(self.fn, device, variant.bf16)
        self.sampling_net = autocast_fp32(self.eager_fn, device, variant.bf16)

    def train_step(self, fn=None):
        """One update as the trainer takes it (its own function), on the fixed batch."""
        self.model.train()
        optimisation_step(self.state, fn or self.fn, self.diffusion, self.x0, self.t, self.noise, self.tc)

    def train_steps(self):
        """``train_chunk`` training steps (one timed measurement)."""
        for _ in range(self.train_chunk):
            self.train_step()

    def sample_chunk(self):
        """``steps`` steps of ancestral sampling at sample_batch."""
        self.model.eval()
        if self.name == "ours":  # +compile: the library's compiled sampling step (network and update in one graph)
            sample(self.diffusion, self.sampling_net, self.x_T.shape, generator=self.gen, device=self.device,
                   x_start=self.x_T, t_start=self.steps - 1, compile=self.variant.compile)
        else:
            from diffusers import DDPMScheduler

            sched = DDPMScheduler(num_train_timesteps=self.diffusion.T, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule="linear", variance_type="fixed_large", clip_sample=True)
            sched.set_timesteps(self.diffusion.T)
            x = self.x_T
            with torch.no_grad():
                for t in sched.timesteps[-self.steps:]:
                    out = self.forward_fp32(x, t.to(self.device).expand(x.shape[0]))
                    x = sched.step(out, t, x, generator=self.gen).prev_sample

    def flops(self):
        """(FLOPs of one training step, of one network forward at sample_batch), counted on
        the eager network: compilation and dtype change the speed, not the FLOPs."""
        train = count_flops(lambda: self.train_step(self.eager_fn))
        x, t = self.x_T, self.t.new_zeros(self.sample_batch)
        self.model.eval()
        with torch.no_grad():
            fwd = count_flops(lambda: self.eager_fn(x, t))
        return train, fwd


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=list(MODELS), default="cifar10")
    p.add_argument("--batch", type=int, default=8, help="training batch (default 8: a slow shared CPU)")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="sampling batch (default: --batch on cpu, 1024 on cuda)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps timed, then extrapolated to 1000 (default 2 on cpu, 25 on cuda)")
    p.add_argument("--repeats", type=int, default=5, help="measurements per number; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--train-chunk", type=int, default=None,
                   help="training steps per timed measurement (default 1 on cpu, 10 on cuda)")
    p.add_argument("--diffusers-variants", default=None,
                   help="variants at which diffusers is measured too (default: all of --variants)")
    p.add_argument("--variants", default="fp32", help="comma-separated: fp32, bf16, cl, compile joined by '+'")
    p.add_argument("--bf16", action="store_true", help="also measure bf16 autocast (adds to --variants)")
    p.add_argument("--channels-last", action="store_true", help="also measure channels_last")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--no-sampling", action="store_true", help="training throughput only")
    p.add_argument("--no-diffusers", action="store_true", help="measure our UNet only")
    p.add_argument("--sweep", default=None, metavar="B1,B2,...",
                   help="also our sampling images/s at each of these batches in turn, up to the first that "
                        "does not fit (e.g. 1024,2048,4096,8192,16384), for each of --sweep-variants")
    p.add_argument("--sweep-variants", default="bf16", help="variants of the sweep (default bf16)")
    p.add_argument("--sweep-steps", type=int, default=3, help="sampling steps timed at each batch of the sweep")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    variants = [Variant.parse(v.strip()) for v in args.variants.split(",") if v.strip()]
    extra = Variant(args.bf16, args.channels_last, args.compile)
    if extra != Variant() and extra not in variants:
        variants.append(extra)
    args.variants = variants
    args.diffusers_variants = (variants if args.diffusers_variants is None else
                               [Variant.parse(v.strip()) for v in args.diffusers_variants.split(",") if v.strip()])
    args.train_chunk = args.train_chunk or (10 if args.device == "cuda" else 1)
    cuda = args.device == "cuda"
    args.sample_batch = args.sample_batch or (1024 if cuda else args.batch)
    args.steps = args.steps or (25 if cuda else 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    use_diffusers = not args.no_diffusers
    diffusers_version = None
    if use_diffusers:
        try:
            import diffusers
            diffusers_version = diffusers.__version__
        except ImportError:
            print("diffusers is not installed (pip install diffusers): measuring our UNet only")
            use_diffusers = False
    cfg = get_preset("cifar10", MODELS[args.model])
    mem = PeakMemory(device)

    print(f"machine: {device_description(device)}; torch {torch.__version__}; diffusers {diffusers_version or 'absent'}")
    peaks = {name: matmul_peak(device, dt, args.repeats) for name, dt in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul peak ({'8192' if device.type == 'cuda' else '2048'}^2, best of {args.repeats}): "
          f"fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")

    nets = build_pair(cfg, device, use_diffusers)
    n_params = num_params(nets["ours"][0])
    diff, diff_cpu = check_same_function(nets, cfg, device)
    print(f"model: {args.model}, {n_params:,} parameters; train batch {args.batch}, sample batch "
          f"{args.sample_batch}")
    print(f"same function (fp32, TF32 off, random weights and inputs): max |ours - diffusers| = {diff:.2e}"
          + (f", max |ours on {device.type} - ours on cpu| = {diff_cpu:.2e}" if device.type != "cpu" else ""))
    if use_diffusers and not diff < 1e-3:
        raise SystemExit("ours and diffusers' networks differ: the comparison would not be like for like")
    if device.type != "cpu" and not diff_cpu < 1e-3:
        raise SystemExit(f"our UNet on {device.type} differs from itself on the CPU by {diff_cpu:.2e}")

    # FLOPs of our network (eager, fp32) stand for both: it is the same network, and
    # FlopCounterMode does not see every fused kernel (e.g. the CPU flash attention
    # that diffusers' attention reaches), so counting each separately would differ.
    m, wrap = nets["ours"]
    flops = Runner("ours", m, wrap, Variant(), cfg, device, args.batch, args.sample_batch, args.steps).flops()

    rows = []
    for variant in args.variants:
        rows += measure_variant(variant, nets, cfg, device, args, flops, mem)

    sweep = []
    if args.sweep:
        print(f"sampling batch sweep ({args.sweep_steps} of the 1000 steps timed at each batch, extrapolated):")
        sweep = sample_batch_sweep(nets["ours"][0], cfg, device,
                                   [Variant.parse(v.strip()) for v in args.sweep_variants.split(",") if v.strip()],
                                   [int(b) for b in args.sweep.split(",")], args.sweep_steps)

    # The peak again after the runs, keeping the better: on a shared machine one
    # measurement may fall in a busy moment (and a model would then seem above peak).
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name] = max(peaks[name], matmul_peak(device, dt, args.repeats))
    print(f"matmul peak, better of before and after the runs: fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    for r in rows:
        r["train_frac_of_peak"] = r["train_tflop_s"] * 1e12 / peaks["bf16" if "bf16" in r["variant"] else "fp32"]

    # Relative to our fp32 eager baseline as well, so variants can be compared directly.
    base_ours = next((r for r in rows if r["impl"] == "ours" and r["variant"] == "fp32"), None)
    print_table(rows, base_ours, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": device_description(device), "torch": torch.__version__, "diffusers": diffusers_version,
            "model": args.model, "params": n_params, "batch": args.batch, "sample_batch": args.sample_batch,
            "sample_steps_timed": args.steps, "repeats": args.repeats, "matmul_peak_flop_s": peaks,
            "max_abs_diff_vs_diffusers": diff, "max_abs_diff_device_vs_cpu": diff_cpu,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "rows": rows, "sample_batch_sweep": sweep}, indent=2))
        print(f"wrote {args.out}")


def measure_variant(variant, nets, cfg, device, args, flops, mem):
    """The result rows of one variant: for ours and (if measured at this variant) diffusers',
    the first call, peak memory, then --repeats timings of training and sampling."""
    runners = {name: Runner(name, m, wrap, variant, cfg, device, args.batch, args.sample_batch, args.steps,
                            args.train_chunk)
               for name, (m, wrap) in nets.items() if name == "ours" or variant in args.diffusers_variants}
    res = {name: {"impl": name, "variant": variant.name} for name in runners}
    for name, r in runners.items():  # warm-up, compilation, optimizer state
        t_compile = timed(r.train_step, device)
        if not args.no_sampling:
            t_compile += timed(r.sample_chunk, device)
        res[name]["first_call_s"] = t_compile
        res[name]["train_flops"], res[name]["fwd_flops"] = flops
        res[name]["train_mem"] = mem.measure(r.train_step)
        if not args.no_sampling:
            res[name]["sample_mem"] = mem.measure(r.sample_chunk)
    train_t = {name: [] for name in runners}
    sample_t = {name: [] for name in runners}
    # Alternate the implementations, in ABBA order, so that load changes on a shared
    # machine hit both alike; the ratios below pair adjacent measurements.
    for i in range(args.repeats):
        for name, r in (list(runners.items()) if i % 2 == 0 else reversed(runners.items())):
            train_t[name].append(timed2(r.train_steps, device))
            if not args.no_sampling:
                sample_t[name].append(timed2(r.sample_chunk, device))
    for name in runners:
        out = res[name]
        t_train = statistics.median(w for w, _ in train_t[name]) / args.train_chunk  # one step
        out["train_img_s"] = args.batch / t_train
        out["train_steps_s"] = 1 / t_train
        out["train_img_cpu_s"] = args.batch * args.train_chunk / statistics.median(c for _, c in train_t[name])
        out["train_tflop_s"] = out["train_flops"] / t_train / 1e12
        out["train_times_s"] = train_t[name]
        if not args.no_sampling:  # timed args.steps steps, extrapolated to 1000
            per_step_wall = statistics.median(w for w, _ in sample_t[name]) / args.steps
            per_step_cpu = statistics.median(c for _, c in sample_t[name]) / args.steps
            out["sample_img_s"] = args.sample_batch / (per_step_wall * 1000)
            out["sample_img_cpu_s"] = args.sample_batch / (per_step_cpu * 1000)
            out["sample_times_s"] = sample_t[name]
    if "diffusers" in runners:
        # Speed ratio ours/diffusers (> 1: ours faster): the median over repeats of
        # the ratio of the two adjacent measurements, wall-clock and CPU time.
        for name in runners:
            for kind, times in (("train", train_t), ("sample", sample_t)):
                for j, clock in ((0, ""), (1, "_cpu")):
                    if times[name]:
                        res[name][f"{kind}_img{clock}_s_vs_diffusers"] = statistics.median(
                            d[j] / o[j] for o, d in zip(times[name], times["diffusers"]))
    for name in runners:  # as it goes: a run cut short by a time limit still says something
        r = res[name]
        print(f"  {name:9s} {variant.name:16s} train {r['train_img_s']:.4g} img/s"
              + (f", sample {r['sample_img_s']:.4g} img/s (1000 steps)" if "sample_img_s" in r else "")
              + f"; first call {r['first_call_s']:.1f} s", flush=True)
    return [res[name] for name in runners]


def sample_batch_sweep(model, cfg, device, variants, batches, steps):
    """Our sampler's images/s (1000 steps, extrapolated from ``steps``) at each batch of
    ``batches`` in turn, per variant, up to the first that does not fit in memory (CUDA: an
    out-of-memory error; the largest that fit is the one to sample at)."""
    diffusion = build_diffusion(cfg)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    model.eval()
    rows = []
    for variant in variants:
        fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        net = autocast_fp32(model, device, variant.bf16)
        for b in batches:
            g = torch.Generator(device=device).manual_seed(0)
            x = None
            try:
                x = torch.randn((b, *shape), generator=g, device=device).contiguous(memory_format=fmt)
                run = lambda: sample(diffusion, net, x.shape, generator=g, device=device, x_start=x,  # noqa: E731
                                     t_start=steps - 1, compile=variant.compile)
                run()  # warm-up (and compilation, kernel selection)
                per_step = statistics.median(timed(run, device) for _ in range(3)) / steps
            except torch.OutOfMemoryError:
                rows.append({"variant": variant.name, "batch": b, "sample_img_s": None, "fits": False})
                print(f"  sweep {variant.name:10s} batch {b:6d}: out of memory", flush=True)
                del x
                gc.collect()
                torch.cuda.empty_cache()
                break
            rows.append({"variant": variant.name, "batch": b, "sample_img_s": b / (per_step * 1000), "fits": True})
            print(f"  sweep {variant.name:10s} batch {b:6d}: {rows[-1]['sample_img_s']:.4g} img/s (1000 steps)",
                  flush=True)
        model.to(memory_format=torch.contiguous_format)
    return rows


def _fmt(v, spec):
    return "n/a" if v is None or v != v else format(v, spec)


def print_table(rows, base_ours, args):
    cpu = args.device == "cpu"

    def ratio(r, key):
        return r[key] / base_ours[key] if base_ours and key in base_ours else None

    cols = ["impl", "variant", "train steps/s", "train img/s", "vs diffusers"] + (["(cpu-time)"] if cpu else []) + \
        ["vs ours fp32", "TFLOP/s", "% peak", "train MiB"]
    if not args.no_sampling:
        cols += ["sample img/s*", "vs diffusers"] + (["(cpu-time)"] if cpu else []) + ["vs ours fp32", "sample MiB"]
    lines = []
    for r in rows:
        line = [r["impl"], r["variant"], _fmt(r["train_steps_s"], ".3g"), _fmt(r["train_img_s"], ".4g"), _fmt(r.get("train_img_s_vs_diffusers"), ".2f")]
        line += [_fmt(r.get("train_img_cpu_s_vs_diffusers"), ".2f")] if cpu else []
        line += [_fmt(ratio(r, "train_img_s"), ".2f"), _fmt(r["train_tflop_s"], ".4f"),
                 _fmt(100 * r["train_frac_of_peak"], ".1f"), _fmt(r["train_mem"] / 2 ** 20, ".0f")]
        if not args.no_sampling:
            line += [_fmt(r["sample_img_s"], ".4g"), _fmt(r.get("sample_img_s_vs_diffusers"), ".2f")]
            line += [_fmt(r.get("sample_img_cpu_s_vs_diffusers"), ".2f")] if cpu else []
            line += [_fmt(ratio(r, "sample_img_s"), ".2f"), _fmt(r["sample_mem"] / 2 ** 20, ".0f")]
        lines.append(line)
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    print()
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for l in lines:
        print(" | ".join(v.ljust(w) for v, w in zip(l, widths)))
    r0 = rows[0]
    print(f"\nEach number: median of {args.repeats} measurements on a possibly shared machine; ours and "
          "diffusers' alternated (ABBA). 'vs diffusers': median over repeats of the ratio of adjacent "
          "measurements of the same variant; > 1: ours is faster.")
    if cpu:
        print("(cpu-time): the same ratio from this process's CPU time instead of wall-clock time; less "
              "sensitive to other processes' load, cleanest with --threads 1.")
    print(f"FLOPs counted by FlopCounterMode: training step {r0['train_flops'] / 1e9:.1f} GFLOP at batch "
          f"{args.batch} (forward + backward), forward {r0['fwd_flops'] / args.sample_batch / 1e9:.3f} GFLOP "
          "per image; '% peak' is against the measured matmul peak of the variant's dtype.")
    if not args.no_sampling:
        print(f"* sampling: {args.steps} of the 1000 steps timed at batch {args.sample_batch}, extrapolated "
              "to 1000 steps (each step runs the same network on the same shapes).")
    print("memory (MiB): peak during one step above what was in use before it "
          f"({'torch.cuda.max_memory_allocated' if not cpu else 'VmHWM of /proc/self/status'}).")
    print(PAPER)

if __name__ == "__main__":
    main()
