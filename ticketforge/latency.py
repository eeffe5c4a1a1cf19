"""Latency numbers a CI can gate on: two ONNX Runtime models timed in interleaved pairs until the
95% interval of the speed-up is narrow, or a time cap is reached.

Why this way:
- Paired runs: each dense run sits next to a compressed run (order alternating), so both models are
  timed under the same conditions over time.
- The speed-up is the ratio of the two models' QUANTILE (10th percentile) times: the part of the
  distribution that other processes disturb least (see QUANTILE).
- Each model runs in SESSIONS session instances, used in turn: a session's own speed depends on
  where its buffers landed in memory, and no single session should decide the result.
- The interval is a moving-block bootstrap over the pairs in time order: noise on a busy machine
  comes in bursts that span many consecutive runs (an i.i.d. bootstrap would make the interval too
  narrow). What differs between processes, which no run within one shows, is added as a fixed
  SYSTEMATIC term.
- A fixed intra-op thread count, so that the numbers mean the same on a runner with more cores.
  With more than one thread, spinning is off: a session's idle workers would otherwise busy-wait
  on the cores its interleaved partner (and the other session instances) are about to use. Tried
  this stop with plain sessions (spinning on), the measured rounds of a budget timed a selection
  that a plain session runs at 1.65x as 2.49x, and the verify step's interval was 1.38-2.77x: the
  interleaved pairs measure each other's spinning (docs/plain-session-timing.md).

Only numpy and onnxruntime are imported (`ticketforge bench` runs on a board without torch)."""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

CONFIDENCE = 0.95
CHECK_RESAMPLES = 300  # enough to tell whether the interval is narrow yet
FINAL_RESAMPLES = 1000  # the reported interval
MIN_PAIRS = 3  # per session instance; below this an interval says nothing
# Session instances per model, used in turn: the same model timed in two fresh sessions differs by
# ~0.5% (where its buffers land in memory), as much as a long run's interval at batch 1 is wide.
SESSIONS = 4
# What no number of runs in one process shows: fresh processes timing the same two files differ by
# up to ~1% (measured here: SD 0.3% between processes at batch 1, and a +-0.5% shift from the order
# in which the sessions were created). Every interval includes this term, added in quadrature.
SYSTEMATIC = 0.01
# The statistic: the 10th percentile of each model's times (their ratio is the speed-up). On a
# shared machine a run is either undisturbed or preempted by another process; a longer run is
# preempted more often, so medians (and per-pair ratios) drift with the neighbours' load, while the
# lower part of the distribution still measures the model. Under noise that scales both models
# alike, any quantile's ratio is the true ratio. Measured at load 10 on 2 cores, where only ~30% of
# a 2.4 ms model's runs went undisturbed: the 20th percentile's upper interval end jumped to 10-16x
# in some runs (a resample with fewer than 20% clean runs), the 10th and 5th percentile's did not.
QUANTILE = 0.1


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
            "statistic": f"{100 * QUANTILE:g}th percentile of the timed runs",
            "sessions": SESSION_OPTIONS,
            "method": "interleaved pairs over session instances; speed-up = ratio of the percentiles; "
                      "moving-block bootstrap interval plus a systematic term"}


# What session_options() sets, for what depends on it (the latency table's cache key, the report).
SESSION_OPTIONS = "intra-op spinning off with more than one thread, 1 inter-op thread"


def session_options(threads: int = 1) -> ort.SessionOptions:
    """The timing sessions' options: the thread count, one inter-op thread and, with more than one
    intra-op thread, no spinning (see the module's docstring). Warnings are off: on the latency
    table's one-layer models they would clutter the run's log."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = resolve_threads(threads)
    opts.inter_op_num_threads = 1
    if opts.intra_op_num_threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(path, provider: str = "CPUExecutionProvider", threads: int = 1) -> ort.InferenceSession:
    """A timing session of a file (or an in-memory onnx.ModelProto: the latency table's one-layer models)."""
    opts = session_options(threads)
    src = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    return ort.InferenceSession(src, opts, providers=[provider])


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


def order_stat(n: int) -> int:
    """Index of the QUANTILE order statistic of n sorted values."""
    return int(QUANTILE * (n - 1))


def _boot_quantiles(series: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The QUANTILE of each series in moving-block bootstrap resamples of the runs in time order
    (paired series resampled with the same indices, so a burst of load stays in both), returns
    (len(series), resamples)."""
    n = len(series[0])
    length = block_length(n)
    blocks = -(-n // length)
    kth = order_stat(n)
    out = np.empty((len(series), resamples))
    chunk = max(1, 1_000_000 // n)  # bound the memory of one gather
    for s in range(0, resamples, chunk):
        c = min(chunk, resamples - s)
        starts = rng.integers(0, n - length + 1, size=(c, blocks))
        idx = (starts[..., None] + np.arange(length)).reshape(c, -1)[:, :n]
        for j, x in enumerate(series):
            out[j, s:s + c] = np.partition(x[idx], kth, axis=1)[:, kth]
    return out


def _interval(point: float, boots: np.ndarray) -> tuple[float, float, float]:
    """(point, low, high) for a log-scale estimate and its bootstrap values: the percentile interval
    at CONFIDENCE, widened by SYSTEMATIC in quadrature; exponentiated."""
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = (float(v) for v in np.percentile(boots, [tail, 100 - tail]))
    sys_ = math.log1p(SYSTEMATIC)
    down, up = math.hypot(max(point - lo, 0.0), sys_), math.hypot(max(hi - point, 0.0), sys_)
    return math.exp(point), math.exp(point - down), math.exp(point + up)


def _quantile(logs: np.ndarray) -> float:
    return float(np.partition(logs, order_stat(len(logs)))[order_stat(len(logs))])


def ratio_interval(base: np.ndarray, new: np.ndarray, resamples: int = FINAL_RESAMPLES, seed: int = 0) -> dict:
    """Speed-up of `new` over `base` from paired times in time order: the ratio of their QUANTILEs,
    with intervals for it and for new's QUANTILE. Times in seconds."""
    lb, ln = np.log(np.asarray(base, dtype=float)), np.log(np.asarray(new, dtype=float))
    qb, qn = _quantile(lb), _quantile(ln)
    boots = _boot_quantiles([lb, ln], resamples, np.random.default_rng(seed))
    speedup, lo, hi = _interval(qb - qn, boots[0] - boots[1])
    new_s, new_lo, new_hi = _interval(qn, boots[1])
    return {"base_s": math.exp(qb), "new_s": new_s, "new_s_ci": [new_lo, new_hi], "speedup": speedup,
            "speedup_ci": [lo, hi]}


def time_interval(times: np.ndarray, resamples: int = FINAL_RESAMPLES, seed: int = 0) -> dict:
    """One model's QUANTILE time and its interval (seconds)."""
    logs = np.log(np.asarray(times, dtype=float))
    boots = _boot_quantiles([logs], resamples, np.random.default_rng(seed))
    t, lo, hi = _interval(_quantile(logs), boots[0])
    return {"s": t, "s_ci": [lo, hi]}


def half_width(ci: list[float], point: float) -> float:
    """Largest relative distance from the point estimate to an end of its interval."""
    return max(point / ci[0] - 1, ci[1] / point - 1)


Clock = Callable[[], float]
Runs = Sequence[Callable[[], object]]  # one callable per session instance


def _timed(fn: Callable[[], object], clock: Clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def paired(run_base: Runs, run_new: Runs, s: Settings, clock: Clock = time.perf_counter, seed: int = 0) -> dict:
    """Time base and new in interleaved pairs until the speed-up's interval is within ±s.ci_target
    (checked after s.min_runs pairs, then every time the pairs grow by a quarter) or s.max_seconds
    have passed, whichever comes first (a slow model may stop below s.min_runs, never below
    MIN_PAIRS). Pair i runs session instance i % k of each model, so no one session's placement
    in memory decides the result. Times in seconds. The floor of s.min_runs keeps the first check
    from stopping on a few runs that happen to agree: a bootstrap interval from few runs is too narrow."""
    k = len(run_base)
    for rb, rn in zip(run_base, run_new):
        for _ in range(s.warmup):
            rb()
            rn()
    base: list[float] = []
    new: list[float] = []
    start = clock()
    next_check = max(s.min_runs, MIN_PAIRS * k)
    while True:
        i = len(base)
        rb, rn = run_base[i % k], run_new[i % k]
        if (i // k) % 2 == 0:  # alternate which goes first: no order effect survives
            base.append(_timed(rb, clock))
            new.append(_timed(rn, clock))
        else:
            new.append(_timed(rn, clock))
            base.append(_timed(rb, clock))
        n = i + 1
        over = clock() - start >= s.max_seconds
        if n >= next_check or (over and n >= MIN_PAIRS * k):
            r = ratio_interval(np.array(base), np.array(new), CHECK_RESAMPLES, seed)
            if half_width(r["speedup_ci"], r["speedup"]) <= s.ci_target or over:
                break
            next_check = max(n + 1, int(n * 1.25))
    seconds = clock() - start
    r = ratio_interval(np.array(base), np.array(new), FINAL_RESAMPLES, seed)
    return {**r, "runs": n, "seconds": seconds,
            "converged": half_width(r["speedup_ci"], r["speedup"]) <= s.ci_target}


def single(run: Runs, s: Settings, clock: Clock = time.perf_counter, seed: int = 0) -> dict:
    """Time one model (a callable per session instance, rotated) until its time's interval is
    within ±s.ci_target or s.max_seconds pass."""
    k = len(run)
    for r in run:
        for _ in range(s.warmup):
            r()
    times: list[float] = []
    start = clock()
    next_check = max(s.min_runs, MIN_PAIRS * k)
    while True:
        times.append(_timed(run[len(times) % k], clock))
        n = len(times)
        over = clock() - start >= s.max_seconds
        if n >= next_check or (over and n >= MIN_PAIRS * k):
            r = time_interval(np.array(times), CHECK_RESAMPLES, seed)
            if half_width(r["s_ci"], r["s"]) <= s.ci_target or over:
                break
            next_check = max(n + 1, int(n * 1.25))
    seconds = clock() - start
    r = time_interval(np.array(times), FINAL_RESAMPLES, seed)
    return {**r, "runs": n, "seconds": seconds, "converged": half_width(r["s_ci"], r["s"]) <= s.ci_target}


# ---------------------------------------------------------------- ONNX models



def compare(base: str | Path, new: str | Path, batches: list[int], s: Settings, *,
            sample_shape: tuple[int, ...] | None = None, dims: dict[str, int] | None = None,
            backend: str = "onnxruntime-cpu", provider: str = "CPUExecutionProvider") -> list[dict]:
    """One latency row per batch: `new` (the compressed model) against `base` (the dense one)."""
    # created in turn, so that neither model gets the memory left over after the other's sessions
    pairs = [(session(base, provider, s.threads), session(new, provider, s.threads)) for _ in range(SESSIONS)]
    sb, sn = [p[0] for p in pairs], [p[1] for p in pairs]
    rows = []
    for b in batches:
        x = feeds(sb[0], b, sample_shape, dims)
        xn = feeds(sn[0], b, sample_shape, dims)
        if {k: (v.shape, v.dtype) for k, v in x.items()} == {k: (v.shape, v.dtype) for k, v in xn.items()}:
            xn = x  # the very same arrays: no difference in where the inputs sit in memory
        r = paired([lambda q=q: q.run(None, x) for q in sb], [lambda q=q: q.run(None, xn) for q in sn], s)
        rows.append({"backend": backend, "provider": provider, "batch": b,
                     "dense_ms": round(r["base_s"] * 1e3, 4), "compressed_ms": round(r["new_s"] * 1e3, 4),
                     "compressed_ms_ci": [round(v * 1e3, 4) for v in r["new_s_ci"]],
                     "speedup": round(r["speedup"], 4), "speedup_ci": [round(v, 4) for v in r["speedup_ci"]],
                     "runs": r["runs"], "seconds": round(r["seconds"], 2), "converged": r["converged"]})
    return rows


def plain(base: str | Path, new: str | Path, batch: int, threads: int, runs: int = 30, *,
          sample_shape: tuple[int, ...] | None = None, warmup: int = 3, clock: Clock = time.perf_counter) -> dict:
    """The pair timed as a user would with their own code: one `InferenceSession` per file with ONNX
    Runtime's default options but the thread count (intra-op spinning on, inter-op at its default),
    `runs` alternating runs, medians. No interval and no bootstrap: this is the independent
    second opinion on the report's method (docs/plain-session-timing.md), not a replacement."""
    opts = []
    for _ in range(2):
        o = ort.SessionOptions()
        o.intra_op_num_threads = resolve_threads(threads)
        o.log_severity_level = 3
        opts.append(o)
    sb, sn = (ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"]) for p, o in zip((base, new), opts))
    x, xn = feeds(sb, batch, sample_shape), feeds(sn, batch, sample_shape)
    for _ in range(warmup):
        sb.run(None, x)
        sn.run(None, xn)
    tb, tn = [], []
    for i in range(runs):
        first, second = ((sb, x, tb), (sn, xn, tn)) if i % 2 == 0 else ((sn, xn, tn), (sb, x, tb))
        for sess, feed, times in (first, second):
            times.append(_timed(lambda: sess.run(None, feed), clock))
    dense, comp = float(np.median(tb)), float(np.median(tn))
    # A plain session's parallel operators wait for their worker threads to get a core: on a busy
    # machine that inflates whichever model has more parallel work (measured: dense 2.8 ms at 1 thread,
    # 18 ms at 2 threads, load 7 on 2 cores). The load says how far to trust the number.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"speedup": round(dense / comp, 4), "dense_ms": round(dense * 1e3, 4), "compressed_ms": round(comp * 1e3, 4),
            "runs": runs, "batch": batch, "threads": resolve_threads(threads),
            "load": round(load, 2) if load is not None else None, "cores": cores(),
            "how": f"one default InferenceSession per file, intra_op_num_threads={resolve_threads(threads)}, "
                   f"median of {runs} alternating runs"}


def measure(path: str | Path, batches: list[int], s: Settings, *, sample_shape: tuple[int, ...] | None = None,
            dims: dict[str, int] | None = None, provider: str = "CPUExecutionProvider") -> list[dict]:
    """One latency row per batch for a single model."""
    sessions = [session(path, provider, s.threads) for _ in range(SESSIONS)]
    rows = []
    for b in batches:
        x = feeds(sessions[0], b, sample_shape, dims)
        r = single([lambda q=q: q.run(None, x) for q in sessions], s)
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
