"""compress under torchrun with 2 gloo processes, against a single process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _tiny import FAST, make_tiny
from ticketforge import distributed
from ticketforge.errors import VerificationError

BIN = Path(sys.executable).parent
ARGS = ["--recipe", "cts", "--sparsity", "0.5", "--set", "search.steps=40", "--set", "search.batch_size=64",
        "--epochs", "2", "--set", "finetune.batch_size=64"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


def test_torchrun_matches_single_process(tmp_path):
    make_tiny(tmp_path)
    multi = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "ticketforge",
                            "compress", "mlp.pt", *ARGS, *FAST, "--out", "ddp"], capture_output=True, text=True,
                           env=_env(), timeout=120)
    assert multi.returncode == 0, multi.stderr[-2000:]
    single = subprocess.run([str(BIN / "ticketforge"), "compress", "mlp.pt", *ARGS, *FAST, "--out", "one"],
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]

    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["ddp", "one"]
    assert "mask identical on all 2 processes" in multi.stderr
    assert multi.stderr.count("wrote ddp/") == 1  # rank 1 says nothing

    import json
    rd, rs = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ddp", "one"))
    assert rd["run"]["processes"] == 2 and rs["run"]["processes"] == 1
    md = torch.load(tmp_path / "ddp" / "ticket.pt", weights_only=True)["masks"]
    ms = torch.load(tmp_path / "one" / "ticket.pt", weights_only=True)["masks"]
    agree = sum(int((md[k] == ms[k]).sum()) for k in md) / sum(m.numel() for m in md.values())
    # Same global batch, different shuffles (DistributedSampler vs RandomSampler): close, not equal.
    assert agree > 0.85, agree
    assert abs(rd["accuracy"]["onnx"] - rs["accuracy"]["onnx"]) <= 0.06


def _ranks_with_masks(rank, world, init_file, same, result):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mask = {"w": torch.tensor([True, False, True, rank == 0 or same])}
        try:
            distributed.check_identical(mask, "mask")
            result.put((rank, "ok"))
        except VerificationError as exc:
            result.put((rank, str(exc)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_mask_check_fails_loudly_when_ranks_differ(tmp_path, same):
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_ranks_with_masks, args=(r, 2, tmp_path / "init", same, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = dict(result.get(timeout=5) for _ in procs)
    if same:
        assert got == {0: "ok", 1: "ok"}
    else:
        assert all("differs between ranks" in msg for msg in got.values())


def test_batch_splits_evenly_or_says_why(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert distributed.per_rank_batch(128) == 64
    with pytest.raises(Exception, match="does not split evenly over 2"):
        distributed.per_rank_batch(129)
