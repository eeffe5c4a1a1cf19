"""The latency method (ticketforge/latency.py): an interval that covers the true speed-up under known
noise, stopping on the interval or the time cap, inputs for any model. Timed with a synthetic
clock, so nothing here depends on how fast or busy the machine is."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ticketforge import latency


class FakeClock:
    """A clock that only moves when a fake model runs: dense takes `base`, compressed `base / ratio`,
    each scaled by lognormal noise, a slow common drift (another process's load, in bursts), and
    a fixed factor per session instance (where a session's buffers landed in memory)."""

    def __init__(self, base: float, ratio: float, noise: float, seed: int, spikes: float = 0.0):
        self.t, self.base, self.ratio, self.noise = 0.0, base, ratio, noise
        self.rng = np.random.default_rng(seed)
        self.load, self.spikes = 1.0, spikes

    def __call__(self) -> float:
        return self.t

    def _run(self, seconds: float) -> None:
        self.load = max(0.5, 0.98 * self.load + 0.02 + 0.05 * self.rng.standard_normal())
        spike = 4.0 if self.rng.random() < self.spikes else 1.0
        self.t += seconds * self.load * spike * float(np.exp(self.noise * self.rng.standard_normal()))

    def sessions(self, seconds: float, k: int, sd: float):
        factors = np.exp(sd * self.rng.standard_normal(k))
        return [lambda f=f: self._run(seconds * f) for f in factors]


def run_fake(ratio=1.7, noise=0.2, seed=0, spikes=0.0, sessions=latency.SESSIONS, session_sd=0.0, **settings):
    clock = FakeClock(1e-3, ratio, noise, seed, spikes)
    dense = clock.sessions(1e-3, sessions, session_sd)
    compressed = clock.sessions(1e-3 / ratio, sessions, session_sd)
    s = latency.Settings(**{"min_runs": 50, "warmup": 2, "max_seconds": 60.0, "ci_target": 0.03, **settings})
    return latency.paired(dense, compressed, s, clock=clock, seed=seed)


def _coverage(**kw) -> int:
    covered = 0
    for seed in range(60):
        r = run_fake(seed=seed, max_seconds=0.2, ci_target=1e-9, **kw)  # a fixed budget: no early stop
        lo, hi = r["speedup_ci"]
        assert lo <= r["speedup"] <= hi
        covered += lo <= 1.7 <= hi
    return covered


def test_interval_covers_the_true_ratio_under_known_noise():
    # Nominal 95%: over 60 independent measurements the interval must hold the truth nearly always.
    assert _coverage() >= 52  # 95% of 60 is 57; a binomial draw below 52 is < 1% likely


def test_interval_covers_the_true_ratio_when_sessions_differ():
    # Each session instance off by ~1% (sd), more than the within-session noise of a long run: the
    # rotation over session instances and the systematic term keep the truth inside.
    assert _coverage(noise=0.05, session_sd=0.01) >= 52


def test_spikes_on_one_side_do_not_move_the_median():
    # 5% of runs 4x slower (a busy neighbour): a mean would shift by ~15%, the median barely moves.
    r = run_fake(ratio=1.0, noise=0.1, spikes=0.05, seed=3, max_seconds=1.0, ci_target=1e-9)
    assert r["speedup_ci"][0] <= 1.0 <= r["speedup_ci"][1]
    assert abs(r["speedup"] - 1.0) < 0.03


def test_stops_once_the_interval_is_narrow():
    r = run_fake(noise=0.05)
    assert r["converged"] and latency.half_width(r["speedup_ci"], r["speedup"]) <= 0.03
    assert r["runs"] < 5000 and r["seconds"] < 10  # quiet: far from the 60 s cap


def test_noisy_measurement_stops_at_the_time_cap_and_says_so():
    r = run_fake(noise=1.5, max_seconds=0.3)
    assert not r["converged"] and r["seconds"] >= 0.3
    assert latency.half_width(r["speedup_ci"], r["speedup"]) > 0.03


def test_time_cap_beats_min_runs_for_a_slow_model():
    r = run_fake(min_runs=10_000, max_seconds=0.05)
    assert latency.MIN_PAIRS * latency.SESSIONS <= r["runs"] < 10_000


def test_no_measurable_change_where_the_interval_contains_one():
    row = {"speedup": 1.02, "speedup_ci": [0.97, 1.06]}
    assert not latency.measurable(row) and latency.describe(row).startswith("no measurable change")
    row = {"speedup": 1.5, "speedup_ci": [1.4, 1.6]}
    assert latency.measurable(row) and latency.describe(row) == "1.50x (1.40-1.60)"
    assert latency.describe({"speedup": 2.0}) == "2.00x"  # a row without interval (TensorRT engine)


def _token_model(path):
    """input_ids (int64) and attention_mask (int64), both [batch, sequence]: a text model's inputs."""
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [5, 4], np.arange(20, dtype=np.float32).tolist())
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["h"]),
             helper.make_node("ReduceMean", ["h", "axes1"], ["logits"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "tok", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[emb, helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
                     helper.make_tensor("axes1", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_feeds_for_integer_and_several_inputs(tmp_path):
    sess = latency.session(_token_model(tmp_path / "tok.onnx"))
    with pytest.raises(latency.InputError, match="sequence"):
        latency.feeds(sess, 2)  # a free dimension nobody named
    x = latency.feeds(sess, 3, dims={"sequence": 7})
    assert x["input_ids"].dtype == np.int64 and x["input_ids"].shape == (3, 7) and x["input_ids"].max() <= 1
    assert (x["attention_mask"] == 1).all()
    # the first input's sample shape names 'sequence' for the second input too
    x = latency.feeds(sess, 2, sample_shape=(9,))
    assert x["attention_mask"].shape == (2, 9)
    assert sess.run(None, x)[0].shape == (2, 4)


def test_compare_real_sessions_gives_complete_rows(tmp_path):
    path = _token_model(tmp_path / "tok.onnx")
    s = latency.Settings(min_runs=5, warmup=1, max_seconds=0.2)
    rows = latency.compare(path, path, [1, 4], s, dims={"sequence": 8})
    for row in rows:
        assert row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1]
        assert row["compressed_ms_ci"][0] <= row["compressed_ms"] <= row["compressed_ms_ci"][1]
        assert row["runs"] >= latency.MIN_PAIRS * latency.SESSIONS
    env = latency.environment("CPUExecutionProvider", 0)
    assert env["threads"] == latency.cores() and env["cpu"] and env["onnxruntime"]


def test_interval_never_narrower_than_the_systematic_term():
    # a perfectly quiet machine: every run the same; between processes ~1% still differs
    base, new = np.full(200, 2e-3), np.full(200, 1e-3)
    r = latency.ratio_interval(base, new)
    assert r["speedup"] == pytest.approx(2.0)
    assert r["speedup_ci"][0] == pytest.approx(2.0 / 1.01) and r["speedup_ci"][1] == pytest.approx(2.0 * 1.01)


@pytest.mark.parametrize("threads", [1, 2])
def test_timing_sessions_do_not_spin_with_more_than_one_thread(tmp_path, threads):
    """Interleaved timing sessions must not busy-wait on each other's cores: with more than one
    intra-op thread spinning is off (plain sessions, spinning on, timed a 1.65x selection as 2.49x),
    one inter-op thread, and the options the report names (latency.SESSION_OPTIONS)."""
    import onnxruntime as ort

    path = str(_token_model(tmp_path / "tok.onnx"))
    opts = latency.session(path, threads=threads).get_session_options()
    assert opts.intra_op_num_threads == threads and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spinning = opts.get_session_config_entry("session.intra_op.allow_spinning") if threads > 1 else None
    assert spinning == ("0" if threads > 1 else None)
    assert "spinning off" in latency.environment("CPUExecutionProvider", threads)["sessions"]
