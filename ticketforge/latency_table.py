"""A measured latency model: each Conv / Linear layer of a model timed alone in ONNX Runtime at a few
candidate widths, at the batch size, thread count and execution provider the report times, and
kept in a cache so that later runs on the same machine, model and batch reuse it.

Why layer-alone subgraphs, not the whole model with one group narrowed:
- A layer's time depends on its input and its output width together (a conv between two coupled
  groups is bilinear in them). Narrowing one group of the whole model at a time gives an additive
  model that misses exactly that product: with both neighbours at half width it over-predicts the
  saving by half (measured on DigitNet's 3x3 convs). A layer alone can be timed on a grid of
  (input, output) widths, and the cost of any selection is then the sum of interpolated entries.
- It is cheap: a layer runs in a fraction of the whole model's time, so a 5 x 5 grid per layer costs
  about as much as a few dozen whole-model runs.
What it misses (Add, pooling, layout changes between layers) is kept as the measured remainder of the
whole dense model, and the verify step times the exported model end to end anyway.

Each entry is the minimum of a few runs after one warm-up: on a busy shared machine the minimum is
the stable estimate of a kernel's own cost (medians of the same entries varied 3x under load, minima
by a few percent), and the table only has to rank and add widths; the reported speed-up always comes
from the interval method on the exported file (ticketforge.latency).

Torch is used only to read the layers' shapes from one forward pass; timing is onnx + onnxruntime."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ticketforge import latency

FORMAT = "ticketforge.latency-table/1"
GRID = 5            # candidate widths timed per axis of a layer (evenly spread, smallest and full included)
RUNS = 5            # timed runs per entry (the minimum is kept), fewer for slow entries
ENTRY_SECONDS = 0.2  # ... at most about this long per entry, but never fewer than MIN_RUNS
MIN_RUNS = 2


@dataclass(frozen=True)
class Layer:
    """One Conv / Linear layer as ONNX Runtime sees it."""

    name: str
    op: str                  # "conv" or "linear"
    cin: int
    cout: int
    sample: tuple[int, ...]  # one sample's input shape: (C, H, W) / (C, L) for a conv, (..., F) for a linear
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        return self.op == "conv" and self.groups == self.cin == self.cout and self.groups > 1

    @property
    def positions(self) -> int:
        """Output values per output channel of one sample (spatial positions, or tokens)."""
        if self.op == "linear":
            return int(np.prod(self.sample[:-1])) if len(self.sample) > 1 else 1
        return int(np.prod([(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                            zip(self.sample[1:], self.pads, self.dilation, self.kernel, self.stride)]))


def layers_of(model, example) -> dict[str, Layer]:
    """Every Conv / Linear of a torch model with the input shape it sees on `example`."""
    import torch
    from torch import nn

    found, hooks = {}, []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        n = names[mod]
        sample = tuple(int(d) for d in inp[0].shape[1:])
        if isinstance(mod, nn.Linear):
            found[n] = Layer(n, "linear", mod.in_features, mod.out_features, sample)
        else:
            if isinstance(mod.padding, str):  # 'same' / 'valid'
                pads = tuple((mod.dilation[i] * (k - 1)) // 2 if mod.padding == "same" else 0
                             for i, k in enumerate(mod.kernel_size))
            else:
                pads = tuple(mod.padding)
            found[n] = Layer(n, "conv", mod.in_channels, mod.out_channels, sample, tuple(mod.kernel_size),
                             tuple(mod.stride), pads, tuple(mod.dilation), mod.groups)

    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return found


def grid(widths: list[int], points: int = GRID) -> list[int]:
    """At most `points` of the sorted candidate `widths`, evenly spread, smallest and largest kept."""
    widths = sorted(set(int(w) for w in widths if w > 0))
    if len(widths) <= points:
        return widths
    idx = np.unique(np.round(np.linspace(0, len(widths) - 1, points)).astype(int))
    return [widths[i] for i in idx]


# ---------------------------------------------------------------- one layer as an ONNX model

def layer_model(layer: Layer, cin: int, cout: int, batch: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """The layer alone at widths (cin, cout), with random weights, and an input for it."""
    rng = np.random.default_rng(0)
    if layer.op == "conv":
        groups = cout if layer.depthwise else 1 if layer.groups == 1 else layer.groups
        if layer.depthwise:
            cin = cout
        w = rng.standard_normal((cout, cin // groups, *layer.kernel)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=list(layer.stride), pads=list(layer.pads) * 2,
                                dilations=list(layer.dilation), group=groups)
        shape = [batch, cin, *layer.sample[1:]]
    else:
        w = rng.standard_normal((cin, cout)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        shape = [batch, *layer.sample[:-1], cin]
        node = None
    nodes = [node] if node is not None else [helper.make_node("MatMul", ["x", "w"], ["m"]),
                                             helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, layer.name or "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, rng.random(shape, dtype=np.float32)


def time_ms(sess, feed: dict, runs: int = RUNS, seconds: float = ENTRY_SECONDS, clock=time.perf_counter) -> float:
    """The minimum over a few runs after one warm-up, in ms (fewer runs for a slow entry)."""
    sess.run(None, feed)
    best, start, n = float("inf"), clock(), 0
    while n < runs and (n < MIN_RUNS or clock() - start < seconds):
        t0 = clock()
        sess.run(None, feed)
        best = min(best, clock() - t0)
        n += 1
    return best * 1e3


# ---------------------------------------------------------------- the table

@dataclass
class Table:
    """Per layer: the widths timed and the time at each (input, output) pair, plus the whole dense
    model's time (what the layers alone do not account for)."""

    layers: dict[str, dict]      # name -> {"in": [...], "out": [...], "ms": [[...]]}
    dense_ms: float              # the whole dense model at this batch (minimum of a few runs)
    batch: int
    context: dict                # what it was measured on (machine, runtime, threads, batch)
    seconds: float = 0.0         # how long building it took
    cached: bool = False         # read from the cache rather than measured in this run
    path: str | None = None

    def ms(self, name: str, cin: float, cout: float) -> float:
        """The layer's time at (cin, cout), bilinear between the timed widths (clamped to them)."""
        e = self.layers[name]
        ins, outs, t = np.array(e["in"], float), np.array(e["out"], float), np.array(e["ms"], float)
        col = np.array([np.interp(cout, outs, row) for row in t])
        return float(np.interp(cin, ins, col)) if len(ins) > 1 else float(col[0])

    @property
    def layers_ms(self) -> float:
        """Sum of every layer at its full width."""
        return sum(self.ms(n, e["in"][-1], e["out"][-1]) for n, e in self.layers.items())

    def total(self, widths: dict[str, tuple[float, float]], activations: float = 1.0) -> float:
        """Predicted time of the whole model with each layer at widths[name] = (cin, cout), in ms:
        the layers' entries, scaled down if alone they add up to more than the whole model, plus what
        the whole model takes beyond its layers (adds, pooling, layout changes: memory-bound work on
        the activations), scaled by `activations`, the fraction of the dense model's layer outputs
        that the widths keep."""
        full = self.layers_ms
        rest = max(0.0, self.dense_ms - full)
        scale = min(1.0, self.dense_ms / full) if full > 0 else 1.0
        return rest * activations + scale * sum(self.ms(n, *widths.get(n, (e["in"][-1], e["out"][-1])))
                                                for n, e in self.layers.items())

    def summary(self) -> dict:
        return {"path": self.path, "cached": self.cached, "seconds": round(self.seconds, 2), "batch": self.batch,
                "layers": len(self.layers), "entries": sum(len(e["in"]) * len(e["out"]) for e in self.layers.values()),
                "dense_ms": round(self.dense_ms, 4), "layers_ms": round(self.layers_ms, 4), "context": self.context}


def cache_dir() -> Path:
    """$TICKETFORGE_CACHE, else $XDG_CACHE_HOME/ticketforge, else ~/.cache/ticketforge."""
    root = os.environ.get("TICKETFORGE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ticketforge"


def context(batch: int, threads: int, provider: str) -> dict:
    """What a table is only valid for: this CPU, runtime, thread count, provider and batch, and the
    sessions it was timed in (tables timed before the timing sessions became plain ones, with
    spinning off, are not reused: spinning changes the times)."""
    import onnxruntime as ort

    return {"cpu": latency.cpu_model(), "cores": latency.cores(), "onnxruntime": ort.__version__,
            "provider": provider, "threads": latency.resolve_threads(threads), "batch": batch,
            "sessions": latency.SESSION_OPTIONS}


def graph_signature(path: str | Path) -> str:
    """The dense model's graph without its weights' values (ops and shapes): the same architecture
    gives the same signature whatever it was trained to."""
    m = onnx.load(str(path), load_external_data=False)
    desc = [[n.op_type, [(a.name, str(helper.get_attribute_value(a))) for a in n.attribute]] for n in m.graph.node]
    desc.append([[list(i.dims)] for i in m.graph.initializer])
    return hashlib.sha256(json.dumps(desc, default=str).encode()).hexdigest()


def build(layers: dict[str, Layer], grids: dict[str, tuple[list[int], list[int]]], dense_onnx: str | Path,
          sample_shape: tuple[int, ...], batch: int, threads: int = 1, provider: str = "CPUExecutionProvider", *, cache: bool = True,
          log=lambda s: None) -> Table:
    """The table for `layers` timed at `grids[name] = (input widths, output widths)`: read from the cache
    when this machine has timed the same model, grids and batch before, else measured and stored."""
    ctx = context(batch, threads, provider)
    spec = {"format": FORMAT, "context": ctx, "graph": graph_signature(dense_onnx),
            "layers": {n: [asdict(layers[n]), list(grids[n][0]), list(grids[n][1])] for n in sorted(grids)}}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:24]
    path = cache_dir() / "latency" / f"{digest}.json"
    if cache and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("spec") == json.loads(json.dumps(spec, sort_keys=True, default=list)):
                log(f"latency table: reused {path} ({len(saved['layers'])} layers, batch {batch})")
                return Table(saved["layers"], saved["dense_ms"], batch, ctx, saved.get("seconds", 0.0), True, str(path))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is measured again and replaced
    t0 = time.perf_counter()
    entries = sum(len(g[0]) * len(g[1]) for g in grids.values())
    log(f"latency table: timing {len(grids)} layers at {entries} widths in ONNX Runtime (batch {batch}, "
        f"{ctx['threads']} thread{'s' if ctx['threads'] != 1 else ''})")
    table = {}
    for name in grids:
        ins, outs = grids[name]
        layer = layers[name]
        ms = []
        for cin in ins:
            row = []
            for cout in outs:
                model, x = layer_model(layer, cin, cout, batch)
                row.append(time_ms(latency.session(model, provider, threads), {"x": x}))
            ms.append(row)
        table[name] = {"in": list(ins), "out": list(outs), "ms": ms}
    dense_sess = latency.session(dense_onnx, provider, threads)
    feed = latency.feeds(dense_sess, batch, sample_shape)
    dense_ms = time_ms(dense_sess, feed, runs=2 * RUNS, seconds=5 * ENTRY_SECONDS)
    seconds = time.perf_counter() - t0
    result = Table(table, dense_ms, batch, ctx, seconds, False, str(path) if cache else None)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"spec": json.loads(json.dumps(spec, sort_keys=True, default=list)), "layers": table,
                                   "dense_ms": dense_ms, "seconds": seconds}, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent run reads the old file or the new one, never half of one
    log(f"latency table: built in {seconds:.1f} s ({result.layers_ms:.3f} ms in the layers alone, "
        f"{dense_ms:.3f} ms the whole dense model)")
    return result
