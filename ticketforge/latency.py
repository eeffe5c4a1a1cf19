"""Latency numbers a CI can gate on: two ONNX Runtime sessions timed in interleaved pairs until the
95% interval of the speed-up is narrow, or a time cap is reached.

Why this way:
- Paired runs: each dense run sits next to a compressed run (order alternating), so load from other
  processes hits both alike and cancels in the pair's ratio.
- The speed-up is the median of the per-pair ratios (robust to the spikes a shared machine adds);
  its interval is a moving-block bootstrap over the pairs, because noise on a busy machine comes in
  bursts that span many consecutive runs (an i.i.d. bootstrap would make the interval too narrow).
- A fixed intra-op thread count, so that the numbers mean the same on a runner with more cores.
  With more than one thread, spinning is off: a session's idle workers would otherwise busy-wait
  on the cores its interleaved partner is about to use.

Only numpy and onnxruntime are imported (`ticketforge bench` runs on a board without torch)."""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

CONFIDENCE = 0.95
CHECK_RESAMPLES = 300  # enough to tell whether the interval is narrow yet
FINAL_RESAMPLES = 1000  # the reported interval
MIN_PAIRS = 3  # below this an interval says nothing


@dataclass(frozen=True)
class Settings:
    min_runs: int = 100
    warmup: int = 5
    max_seconds: float = 5.0
    ci_target: float = 0.03
    threads: int = 1


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    return threads if threads > 0 else cores()


def cpu_model() -> str:
    """The CPU's model string (as /proc/cpuinfo names it on x86 and on ARM boards)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def environment(provider: str, threads: int) -> dict:
    """What the numbers were measured on, for the report."""
    threads = resolve_threads(threads)
    return {"cpu": cpu_model(), "cores": cores(), "onnxruntime": ort.__version__, "provider": provider,
            "threads": threads, "confidence": CONFIDENCE,
            "method": "interleaved pairs; speed-up = median of per-pair ratios; moving-block bootstrap interval"}


def session(path: str | Path, provider: str = "CPUExecutionProvider", threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = resolve_threads(threads)
    opts.inter_op_num_threads = 1
    if opts.intra_op_num_threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=[provider])


# ---------------------------------------------------------------- inputs

FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
INTS = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


class InputError(ValueError):
    """The model's inputs cannot be filled from what was given (a free dimension, an odd type)."""


def feeds(sess: ort.InferenceSession, batch: int, sample_shape: tuple[int, ...] | None = None,
          dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the right shape and type for every input of `sess`, with `batch` on the first
    axis. `sample_shape` (one sample of the first input) names the sizes of its free dimensions, which
    other inputs with the same dimension names share (input_ids and attention_mask: 'sequence');
    `dims` names any other. Integer inputs get 0/1 (valid token ids for any vocabulary; ones for a
    mask); the time does not depend on the values."""
    rng = np.random.default_rng(seed)
    known = dict(dims or {})
    inputs = sess.get_inputs()
    if sample_shape is not None and inputs:
        rest = inputs[0].shape[1:]
        if len(rest) != len(sample_shape):
            raise InputError(f"input {inputs[0].name} has {len(rest) + 1} dimensions, the samples {len(sample_shape) + 1}")
        for d, size in zip(rest, sample_shape):
            if not isinstance(d, int):
                known.setdefault(str(d), int(size))
    out = {}
    for k, inp in enumerate(inputs):
        shape = [batch]
        if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] not in (batch, -1, 0):
            raise InputError(f"input {inp.name} has a fixed batch of {inp.shape[0]}; cannot time batch {batch}")
        for j, d in enumerate(inp.shape[1:], start=1):
            if k == 0 and sample_shape is not None:
                shape.append(int(sample_shape[j - 1]))
            elif isinstance(d, int) and d > 0:
                shape.append(d)
            elif str(d) in known:
                shape.append(known[str(d)])
            else:
                raise InputError(f"input {inp.name}: dimension {j} ({d}) has no fixed size; give it, e.g. --dim {d}=128")
        if inp.type in FLOATS:
            out[inp.name] = rng.random(shape).astype(FLOATS[inp.type])
        elif inp.type in INTS:
            fill = np.ones(shape) if "mask" in inp.name.lower() else rng.integers(0, 2, shape)
            out[inp.name] = fill.astype(INTS[inp.type])
        elif inp.type == "tensor(bool)":
            out[inp.name] = np.ones(shape, dtype=bool)
        else:
            raise InputError(f"input {inp.name}: cannot make test data of type {inp.type}")
    return out


# ---------------------------------------------------------------- the statistics

def block_length(n: int) -> int:
    """Moving-block length ~ n^(1/3), the usual rate for variance-type statistics."""
    return max(1, round(n ** (1 / 3)))


def _boot_medians(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of `resamples` moving-block bootstrap resamples of the series x."""
    n = len(x)
    length = block_length(n)
    blocks = -(-n // length)
    keep = n - 1 + n % 2  # an odd count: the median is one order statistic (np.partition, no averaging)
    mid = keep // 2
    out = np.empty(resamples)
    chunk = max(1, 1_000_000 // n)  # bound the memory of one gather
    for s in range(0, resamples, chunk):
        m = min(chunk, resamples - s)
        starts = rng.integers(0, n - length + 1, size=(m, blocks))
        idx = (starts[..., None] + np.arange(length)).reshape(m, -1)[:, :keep]
        out[s:s + m] = np.partition(x[idx], mid, axis=1)[:, mid]
    return out


def _interval(x: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """(median, low, high) of x, the interval a percentile block bootstrap at CONFIDENCE."""
    point = float(np.median(x))
    boots = _boot_medians(x, resamples, np.random.default_rng(seed))
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = (float(v) for v in np.percentile(boots, [tail, 100 - tail]))
    return point, min(lo, point), max(hi, point)  # the point estimate always lies inside its interval


def ratio_interval(base: np.ndarray, new: np.ndarray, resamples: int = FINAL_RESAMPLES, seed: int = 0) -> dict:
    """Speed-up of `new` over `base` (paired times, same length): median per-pair ratio and interval."""
    logr = np.log(np.asarray(base, dtype=float)) - np.log(np.asarray(new, dtype=float))
    point, lo, hi = _interval(logr, resamples, seed)
    return {"speedup": math.exp(point), "speedup_ci": [math.exp(lo), math.exp(hi)]}


def half_width(ci: list[float], point: float) -> float:
    """Largest relative distance from the point estimate to an end of its interval."""
    return max(point / ci[0] - 1, ci[1] / point - 1)


Clock = Callable[[], float]


def _timed(fn: Callable[[], object], clock: Clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def paired(run_base: Callable[[], object], run_new: Callable[[], object], s: Settings,
           clock: Clock = time.perf_counter, seed: int = 0) -> dict:
    """Time the two callables in interleaved pairs until the speed-up's interval is within
    ±s.ci_target (checked after s.min_runs pairs, then every time the pairs grow by a quarter) or
    s.max_seconds have passed, whichever comes first (a slow model may stop below s.min_runs, never
    below MIN_PAIRS). Times in seconds. The floor of s.min_runs keeps the first check from stopping
    on a few runs that happen to agree: a bootstrap interval from few runs is too narrow."""
    for _ in range(s.warmup):
        run_base()
        run_new()
    base: list[float] = []
    new: list[float] = []
    start = clock()
    next_check = max(s.min_runs, MIN_PAIRS)
    while True:
        if len(base) % 2 == 0:  # alternate which goes first: no order effect survives the median
            base.append(_timed(run_base, clock))
            new.append(_timed(run_new, clock))
        else:
            new.append(_timed(run_new, clock))
            base.append(_timed(run_base, clock))
        n = len(base)
        over = clock() - start >= s.max_seconds
        if n >= next_check or (over and n >= MIN_PAIRS):
            r = ratio_interval(np.array(base), np.array(new), CHECK_RESAMPLES, seed)
            converged = half_width(r["speedup_ci"], r["speedup"]) <= s.ci_target
            if converged or over:
                break
            next_check = max(n + 1, int(n * 1.25))
    seconds = clock() - start
    b, c = np.array(base), np.array(new)
    r = ratio_interval(b, c, FINAL_RESAMPLES, seed)
    c_med, c_lo, c_hi = _interval(c, FINAL_RESAMPLES, seed + 1)
    return {"base_s": float(np.median(b)), "new_s": c_med, "new_s_ci": [c_lo, c_hi], **r, "runs": n,
            "seconds": seconds, "converged": half_width(r["speedup_ci"], r["speedup"]) <= s.ci_target}


def single(run: Callable[[], object], s: Settings, clock: Clock = time.perf_counter, seed: int = 0) -> dict:
    """Time one callable until its median's interval is within ±s.ci_target or s.max_seconds pass."""
    for _ in range(s.warmup):
        run()
    times: list[float] = []
    start = clock()
    next_check = max(s.min_runs, MIN_PAIRS)
    while True:
        times.append(_timed(run, clock))
        n = len(times)
        over = clock() - start >= s.max_seconds
        if n >= next_check or (over and n >= MIN_PAIRS):
            med, lo, hi = _interval(np.array(times), CHECK_RESAMPLES, seed)
            if half_width([lo, hi], med) <= s.ci_target or over:
                break
            next_check = max(n + 1, int(n * 1.25))
    seconds = clock() - start
    med, lo, hi = _interval(np.array(times), FINAL_RESAMPLES, seed)
    return {"s": med, "s_ci": [lo, hi], "runs": n, "seconds": seconds,
            "converged": half_width([lo, hi], med) <= s.ci_target}


# ---------------------------------------------------------------- ONNX models

def compare(base: str | Path, new: str | Path, batches: list[int], s: Settings, *,
            sample_shape: tuple[int, ...] | None = None, dims: dict[str, int] | None = None,
            backend: str = "onnxruntime-cpu", provider: str = "CPUExecutionProvider") -> list[dict]:
    """One latency row per batch: `new` (the compressed model) against `base` (the dense one)."""
    sb, sn = session(base, provider, s.threads), session(new, provider, s.threads)
    rows = []
    for b in batches:
        x = feeds(sb, b, sample_shape, dims)
        xn = feeds(sn, b, sample_shape, dims)
        r = paired(lambda: sb.run(None, x), lambda: sn.run(None, xn), s)
        rows.append({"backend": backend, "provider": provider, "batch": b,
                     "dense_ms": round(r["base_s"] * 1e3, 4), "compressed_ms": round(r["new_s"] * 1e3, 4),
                     "compressed_ms_ci": [round(v * 1e3, 4) for v in r["new_s_ci"]],
                     "speedup": round(r["speedup"], 4), "speedup_ci": [round(v, 4) for v in r["speedup_ci"]],
                     "runs": r["runs"], "seconds": round(r["seconds"], 2), "converged": r["converged"]})
    return rows


def measure(path: str | Path, batches: list[int], s: Settings, *, sample_shape: tuple[int, ...] | None = None,
            dims: dict[str, int] | None = None, provider: str = "CPUExecutionProvider") -> list[dict]:
    """One latency row per batch for a single model."""
    sess = session(path, provider, s.threads)
    rows = []
    for b in batches:
        x = feeds(sess, b, sample_shape, dims)
        r = single(lambda: sess.run(None, x), s)
        rows.append({"provider": provider, "batch": b, "ms": round(r["s"] * 1e3, 4),
                     "ms_ci": [round(v * 1e3, 4) for v in r["s_ci"]], "runs": r["runs"],
                     "seconds": round(r["seconds"], 2), "converged": r["converged"]})
    return rows


def measurable(row: dict) -> bool:
    """False where the speed-up's interval contains 1.0: the data cannot tell it from no change."""
    ci = row.get("speedup_ci")
    return ci is None or not ci[0] <= 1.0 <= ci[1]


def describe(row: dict) -> str:
    """The speed-up as a person should read it."""
    ci = row.get("speedup_ci")
    if ci is None:
        return f"{row['speedup']:.2f}x"
    if not measurable(row):
        return f"no measurable change ({ci[0]:.2f}-{ci[1]:.2f}x)"
    return f"{row['speedup']:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})"
