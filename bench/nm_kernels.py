"""Do 2:4 weights run faster on this GPU? Time PyTorch's semi-structured sparse kernels
(torch.sparse.to_sparse_semi_structured: CUTLASS / cuSPARSELt on sparse tensor cores) against the
dense fp16 matmul, for the eligible Linear shapes of the built-in ViT and for transformer-sized ones.

    .venv/bin/python bench/nm_kernels.py [--tokens 64 4096] [--json out.json]

Needs a CUDA GPU with sparse tensor cores (compute capability 8.0 or newer); on any other machine it
says so and exits 1 without timing anything. Prints one row per (shape, tokens): dense and sparse
median latency, speed-up, and the max abs difference of the outputs."""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from ticketforge import models
from ticketforge.structures.nm import pattern as nm

# Transformer MLP and attention shapes (out, in) where 2:4 is known to pay on an A100
# (PyTorch's semi-structured tutorial: BERT-base 1.3x end to end).
LARGE = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]


def builtin_shapes() -> list[tuple[int, int]]:
    """Eligible Linear weights of the default built-in ViT."""
    model = models.build("vit")
    eligible, _ = nm.split_layers(model)
    weights = dict(model.named_parameters())
    return sorted({tuple(weights[n].shape) for n in eligible if weights[n].dim() == 2})


def time_ms(fn) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 4096], help="rows of the input (batch x sequence)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("nm_kernels: no CUDA GPU here; 2:4 kernels need sparse tensor cores (Ampere or newer). Not run.")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        sys.exit(f"nm_kernels: {torch.cuda.get_device_name()} is compute capability {major}.{minor}; "
                 "2:4 sparse tensor cores need 8.0 or newer. Not run.")
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16")
    print(f"{'weight (out, in)':>18} {'tokens':>7} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>9} {'max |diff|':>11}")
    for source, shapes in (("vit", builtin_shapes()), ("large", LARGE)):
        for out_f, in_f in shapes:
            w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
            w = w * nm.nm_mask(w.abs()).to(w.device, w.dtype)  # 2:4 along in_features, as ticketforge prunes
            try:
                ws = to_sparse_semi_structured(w)
            except Exception as exc:  # too small or unaligned for the sparse kernels
                print(f"{str((out_f, in_f)):>18}  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
                try:
                    diff = float((F.linear(x, w) - F.linear(x, ws)).abs().max())
                    dense, sparse = time_ms(lambda: F.linear(x, w)), time_ms(lambda: F.linear(x, ws))
                except Exception as exc:
                    print(f"{str((out_f, in_f)):>18} {tokens:>7}  failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:80]}")
                    continue
                row = {"source": source, "out": out_f, "in": in_f, "tokens": tokens, "dense_ms": dense,
                       "sparse_ms": sparse, "speedup": dense / sparse, "max_abs_diff": diff}
                rows.append(row)
                print(f"{str((out_f, in_f)):>18} {tokens:>7} {dense:>9.4f} {sparse:>9.4f} {row['speedup']:>8.2f}x "
                      f"{diff:>11.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
