"""Budgets users think in: a measured speed-up, a latency or a file size, instead of a sparsity or
a fraction of the MACs.

- `search.target_speedup`: the exported model's speed-up over dense.onnx, as the report measures it
  (ONNX Runtime with `validate.budget_threads`, every core by default; interleaved pairs, median of
  the per-pair ratios);
- `search.target_latency_ms`: the exported model's median latency;
- `search.max_size_mb`: the size of the deployed file (model.onnx, with sparse storage; model.int8.onnx
  when `export.quantize: int8`).
Both timed budgets are taken at `validate.budget_batch` (default: the largest of
`validate.latency_batches`). Exactly one budget per run: a key that sets a budget (`sparsity`,
`target_macs`, `blocks`, or one of the above) given beside another is exit 2, naming both.

This module is torch-free (the recipe schema calls `check`); `close_loop` is the verify-and-adjust
loop, written over callables so that it runs the same on real timings and on a test's fake timer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ticketforge.errors import UserError

LATENCY_KEYS = ("target_speedup", "target_latency_ms")
SIZE_KEY = "max_size_mb"
# `search` keys that tune how a latency budget is met without setting one.
TUNING_KEYS = ("budget_margin", "measure_rounds")
USER_KEYS = LATENCY_KEYS + (SIZE_KEY,)
# Every `search` key that sets how much is removed: at most one of them per run.
ALL_KEYS = ("sparsity", "target_macs", "blocks") + USER_KEYS


def given(recipe) -> list[str]:
    """The budget keys the recipe sets itself (not schema defaults). A key written with the value
    that means "not set" (`blocks: 0`: use target_macs) sets nothing."""
    source = getattr(recipe, "source", None)
    search = (source or {}).get("search") or {}
    unset = {f.name: f.metadata.get("unset") for f in dataclasses.fields(recipe.search)}
    return [k for k in ALL_KEYS if k in search and search[k] is not None
            and not (unset.get(k) is not None and search[k] == unset[k])]


def key(recipe) -> str | None:
    """The user budget of this run (one of USER_KEYS), or None for the structure's own budget."""
    for k in USER_KEYS:
        if getattr(recipe.search, k) is not None:
            return k
    return None


def check(recipe, choosable: tuple[str, ...]) -> None:
    """Exactly one budget per run, of those the structure can choose (`choosable`)."""
    keys = [k for k in given(recipe) if k in choosable]
    if len(keys) > 1:
        raise UserError(f"recipe keys 'search.{keys[0]}' and 'search.{keys[1]}' both set a budget; a run has "
                        f"exactly one: keep one of them")
    search = (getattr(recipe, "source", None) or {}).get("search") or {}
    for tuning in TUNING_KEYS:
        if tuning in search and key(recipe) not in LATENCY_KEYS:
            raise UserError(f"recipe key 'search.{tuning}' is read only with a latency budget "
                            f"(search.target_speedup or search.target_latency_ms); remove it")
    b = recipe.validate.budget_batch
    if b is not None and b not in recipe.validate.latency_batches:
        raise UserError(f"recipe key 'validate.budget_batch': {b} is not timed; validate.latency_batches is "
                        f"{recipe.validate.latency_batches}")


def batch(recipe) -> int:
    """The batch size a latency budget is taken at."""
    return recipe.validate.budget_batch or max(recipe.validate.latency_batches)


def threads(recipe) -> int:
    """The ONNX Runtime threads a latency budget is taken with (0: every core). Not the report's
    `validate.threads` (1, so that latency rows compare across machines): a budget is a promise
    about the deployed model, and a plain InferenceSession uses every core. A model 2.2x faster
    on one thread measured 1.7x on two."""
    return recipe.validate.budget_threads


def latency_fraction(recipe, dense_ms: float) -> tuple[float, float]:
    """A timed budget as the fraction of the dense model's time to keep, aimed `budget_margin`
    beyond the target (what the latency table does not predict); returns (fraction, aim)."""
    aim = 1 + recipe.search.budget_margin
    if key(recipe) == "target_speedup":
        return 1 / (recipe.search.target_speedup * aim), aim
    return recipe.search.target_latency_ms / aim / dense_ms, aim


def describe(recipe) -> str | None:
    """The user budget in words, or None."""
    k = key(recipe)
    if k is None:
        return None
    v = getattr(recipe.search, k)
    if k == "target_speedup":
        return f"{v:g}x faster than dense at batch {batch(recipe)}"
    if k == "target_latency_ms":
        return f"at most {v:g} ms at batch {batch(recipe)}"
    return f"at most {v:g} MB on disk"


@dataclass(frozen=True)
class Target:
    """A budget as the verify loop sees it: `value` on the scale `unit`, met when the measured value is
    at least it (`higher`, a speed-up) or at most it."""

    key: str
    value: float
    unit: str     # "x", "ms", "MB"
    higher: bool

    @classmethod
    def of(cls, recipe) -> "Target | None":
        k = key(recipe)
        if k is None:
            return None
        v = float(getattr(recipe.search, k))
        return cls(k, v, {"target_speedup": "x", "target_latency_ms": "ms", SIZE_KEY: "MB"}[k],
                   k == "target_speedup")

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.higher else measured <= self.value

    def shortfall(self, measured: float) -> float:
        """How much cheaper the model must get, as a factor on its cost (< 1 when not met)."""
        return measured / self.value if self.higher else self.value / measured

    def fmt(self, v: float) -> str:
        return f"{v:.2f}x" if self.unit == "x" else f"{v:.3f} {self.unit}" if self.unit == "ms" else f"{v:.3f} MB"


# A measurement of the exported model against a Target: {"value": float, "ci": [lo, hi] or None, ...}
Measure = Callable[[], dict]
# Make the model cheaper by a factor (the cost it should keep, < 1); False when nothing is left to remove.
Tighten = Callable[[float], bool]


def close_loop(target: Target, measure: Measure, tighten: Tighten, rounds: int, *, step: float = 0.03,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure; while the target is not met and rounds are left, tighten by the shortfall (plus
    `step`, so that a round does not stop just short of the target again) and measure again.
    Returns the report's budget section: target, every attempt, the final measurement, met or not."""
    attempts, stopped = [], "met"
    while True:
        m = measure()
        attempts.append(m)
        log(f"budget: {target.key} {target.fmt(target.value)}: measured {_fmt(target, m)} "
            f"({'met' if target.met(m['value']) else 'not met'})")
        if target.met(m["value"]):
            break
        if len(attempts) > rounds:
            stopped = "rounds"
            break
        keep = target.shortfall(m["value"]) / (1 + step)
        if not tighten(keep):
            stopped = "nothing left"
            log("budget: nothing left to remove (the structure is at its smallest allowed size)")
            break
    final = attempts[-1]
    met = target.met(final["value"])
    best = max(attempts, key=lambda a: a["value"] if target.higher else -a["value"])
    verdict = "met" if met else f"not met (closest: {_fmt(target, best)})"
    return {"key": f"search.{target.key}", "target": target.value, "unit": target.unit, "measured": final["value"],
            "ci": final.get("ci"), "met": met, "verdict": verdict, "adjustments": len(attempts) - 1,
            "stopped": stopped, "attempts": attempts}


def _fmt(target: Target, m: dict) -> str:
    ci = m.get("ci")
    return target.fmt(m["value"]) + (f" (95% interval {ci[0]:.3g}-{ci[1]:.3g})" if ci else "")


def markdown(section: dict) -> str:
    """The report's budget line."""
    unit = section["unit"]
    fmt = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{v:.3f} {unit}")
    ci = section.get("ci")
    where = ""
    if section.get("batch"):
        n = section.get("threads")
        where = f" at batch {section['batch']} ({section['backend']}" + (f", {n} thread{'s' * (n != 1)})" if n else ")")
    return (f"Budget `{section['key']}` {fmt(section['target'])}{where}: measured {fmt(section['measured'])}"
            + (f" (95% interval {ci[0]:.3g}-{ci[1]:.3g})" if ci else "")
            + f", **{section['verdict']}**"
            + (f" after {section['adjustments']} adjustment(s)" if section.get("adjustments") else "") + "."
            + (plain_text(section["plain"]) if section.get("plain") else ""))


def plain_text(p: dict) -> str:
    """The plain-session timing, with the machine's load when it was taken (a busy machine distorts it)."""
    busy = p.get("load") is not None and p.get("cores") and p["load"] > p["cores"]
    return (f" A plain session measures {p['speedup']:.2f}x ({p['how']}"
            + (f"; load average {p['load']:.1f} on {p['cores']} cores: the machine was busy, and a plain "
               "session's worker threads then wait for cores, which distorts this number" if busy else "") + ").")
