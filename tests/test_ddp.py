"""DDP: two CPU processes (gloo) with the same global batch train like one process.

The per-example randomness (t, noise, flips) comes from one generator that every rank
advances over the whole global batch, and the data order is a function of the global
stream position, so with dropout 0 the only difference between 1 and 2 processes is
the float summation order of the gradient all-reduce. The two processes also accumulate
their shares of the batch in microbatches (train.microbatch, DDP's no_sync): the update
stays the same.
"""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_train import assert_same_weights, make_image_folder, tiny_config  # noqa: E402

from ddpm import train as TR  # noqa: E402
from ddpm.checkpoint import read_checkpoint  # noqa: E402

OVERRIDES = {"model.dropout": 0.0, "train.steps": 6, "train.batch_size": 8, "train.ckpt_every": 3,
             "train.log_every": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    TR.train(tiny_config(Path(folder), **OVERRIDES, **{"train.microbatch": 2}), out, device="cpu", progress=False)
    assert not dist.is_initialized(), "train() must tear down the process group it created"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_processes_with_microbatches_equal_one(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=20)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        TR.train(tiny_config(folder, **OVERRIDES), tmp_path / "one", device="cpu", progress=False)
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path / "two")), nprocs=2, join=True)

    one, two = read_checkpoint(tmp_path / "one" / "final.pt"), read_checkpoint(tmp_path / "two" / "final.pt")
    assert_same_weights(one["model"], two["model"], exact=False, atol=1e-5)
    assert_same_weights(one["ema"], two["ema"], exact=False, atol=1e-5)
    # the runs really trained: the weights moved from their (seed-determined) start far beyond
    # the tolerance (6 Adam steps with warm-up move a weight by at most about 8e-4)
    torch.manual_seed(TR.derive_seed(0, 0))
    init = TR.build_model(tiny_config(folder, **OVERRIDES)).state_dict()
    moved = max((one["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 4e-4
    s1 = [json.loads(x) for x in (tmp_path / "one" / "stats.jsonl").read_text().splitlines()]
    s2 = [json.loads(x) for x in (tmp_path / "two" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in s1] == [r["step"] for r in s2] == [3, 6]
    for a, b in zip(s1, s2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loss_by_t_quarter"] == pytest.approx(b["loss_by_t_quarter"], rel=1e-5)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert len(two["rng"]["ranks"]) == 2  # both ranks' RNG states, written by rank 0 only
