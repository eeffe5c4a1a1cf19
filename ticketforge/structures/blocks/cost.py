"""What each removable block costs, on the scale of the run's budget: MACs (search.target_macs), its
layers' measured time in ONNX Runtime (search.target_speedup / target_latency_ms; the layers of
ticketforge.latency_table at full width, a 1 x 1 grid each) or its parameter bytes (search.max_size_mb).
Blocks follow one another, so their costs add up."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ticketforge import adapt, budget


def block_costs(model, names: list[str], recipe, example, log=lambda s: None) -> tuple[dict, float, float, dict]:
    """(cost per block, the dense model's cost, the fraction of it to keep, report info)."""
    from ticketforge import latency_table
    from ticketforge.macs import layer_macs
    from ticketforge.export import export_dense_copy

    k = budget.key(recipe)
    if k is None:
        counted = layer_macs(model, example[:2])
        return ({n: counted.within(n) for n in names}, counted.total, recipe.search.target_macs,
                {"cost": "macs"})
    with tempfile.TemporaryDirectory() as tmp:
        dense = export_dense_copy(model, example, Path(tmp) / "dense.onnx")
        if k == budget.SIZE_KEY:
            costs = {n: 4.0 * sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names}
            total = float(dense.stat().st_size)
            return costs, total, recipe.search.max_size_mb * 2 ** 20 / total, {"cost": "parameter bytes"}
        layers = latency_table.layers_of(model, example)
        table = latency_table.build(layers, {n: ([l.cin], [l.cout]) for n, l in layers.items()}, dense,
                                    adapt.graph_sample_shape(model, example), budget.batch(recipe), budget.threads(recipe), log=log)
    full = table.layers_ms
    scale = min(1.0, table.dense_ms / full) if full > 0 else 1.0
    costs = {n: scale * sum(table.ms(l, layers[l].cin, layers[l].cout) for l in layers if l.startswith(n + "."))
             for n in names}
    target, aim = budget.latency_fraction(recipe, table.dense_ms)
    return costs, table.dense_ms, target, {"cost": "measured latency table", "latency_table": table.summary(),
                                           "aim": aim}
