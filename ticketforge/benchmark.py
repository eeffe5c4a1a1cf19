"""`ticketforge bench`: the report's latency method on its own, for the board the model will run on.

Needs only onnxruntime and numpy (no torch): copy the .onnx files to the device, pip install
onnxruntime numpy click pyyaml rich and this package without its dependencies, and time there."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ticketforge import latency
from ticketforge.errors import UserError


def parse_dims(items: tuple[str, ...] | list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, _, size = item.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise UserError(f"--dim {item!r}: expected NAME=SIZE with a positive size, e.g. sequence=128")
        dims[name.strip()] = int(size)
    return dims


def _open(path: Path, provider: str, threads: int) -> None:
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        latency.session(path, provider, threads)
    except Exception as exc:  # onnxruntime's own exception types: the file is not a model it can run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime ({provider}) cannot load {path}: {first}") from None


def run(model: Path, compare: Path | None, batches: list[int], settings: latency.Settings,
        dims: dict[str, int] | None = None, provider: str = "CPUExecutionProvider") -> dict:
    """Latency of `model` per batch; with `compare` (a baseline such as dense.onnx), its speed-up
    over it from interleaved pairs. Each number comes with its 95% interval."""
    if provider not in ort.get_available_providers():
        raise UserError(f"provider {provider} is not available here; available: {', '.join(ort.get_available_providers())}")
    for path in (model, compare):
        if path is not None:
            _open(Path(path), provider, settings.threads)
    try:
        if compare is None:
            rows = latency.measure(model, batches, settings, dims=dims, provider=provider)
        else:
            rows = [{"batch": r["batch"], "baseline_ms": r["dense_ms"], "model_ms": r["compressed_ms"],
                     "model_ms_ci": r["compressed_ms_ci"], "speedup": r["speedup"], "speedup_ci": r["speedup_ci"],
                     "runs": r["runs"], "seconds": r["seconds"], "converged": r["converged"]}
                    for r in latency.compare(compare, model, batches, settings, dims=dims, provider=provider)]
    except latency.InputError as exc:
        raise UserError(str(exc)) from None
    return {"model": str(model), "compare": str(compare) if compare is not None else None,
            "environment": latency.environment(provider, settings.threads),
            "settings": {"min_runs": settings.min_runs, "warmup": settings.warmup, "max_seconds": settings.max_seconds,
                         "ci_target": settings.ci_target},
            "rows": rows}


def to_text(result: dict) -> str:
    env = result["environment"]
    head = (f"{env['cpu']}; ONNX Runtime {env['onnxruntime']}, {env['provider']}, {env['threads']} "
            f"thread{'s' if env['threads'] != 1 else ''}; 95% intervals from interleaved runs")
    model = Path(result["model"]).name
    if result["compare"] is None:
        table = [["batch", f"{model} ms", "95% interval", "runs"]]
        table += [[str(r["batch"]), f"{r['ms']:.4g}", f"{r['ms_ci'][0]:.4g}-{r['ms_ci'][1]:.4g}", str(r["runs"])]
                  for r in result["rows"]]
    else:
        base = Path(result["compare"]).name
        table = [["batch", f"{base} ms", f"{model} ms (95% high)", f"speed-up of {model}", "runs"]]
        table += [[str(r["batch"]), f"{r['baseline_ms']:.4g}", f"{r['model_ms']:.4g} ({r['model_ms_ci'][1]:.4g})",
                   latency.describe(r), str(r["runs"])] for r in result["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    capped = [str(r["batch"]) for r in result["rows"] if not r["converged"]]
    if capped:
        lines.append(f"(batch {', '.join(capped)}: stopped at the time cap before the interval was within "
                     f"+-{100 * result['settings']['ci_target']:g}%; a longer --max-seconds narrows it)")
    return "\n".join(lines)
