"""report.json as a type: what `compress` writes, and what report.md, report.html, the gate and the
sweep read. One place says which sections a report has; an old or hand-edited report.json that
lacks a required one is a clear error naming it, not a KeyError somewhere in a reader.

Sections stay plain mappings (they are JSON, and their rows are what the report tables show);
the report itself is typed, so a reader's typo is an AttributeError at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ticketforge.errors import UserError


@dataclass
class Report:
    ticketforge_version: str
    recipe: dict                 # the resolved recipe (Recipe.to_dict())
    seed: int
    device: str
    model: dict                  # path, kind, arch, conversions_before
    data: dict                   # spec, train, val, input_shape, classes
    search: dict                 # the search method's summary (method, steps, rounds, ...)
    convert: dict                # the structure's summary
    sparsity: dict               # target, achieved (read from model.onnx), torch, per_layer
    params: dict                 # dense / compressed non-zero parameters and weights, from the ONNX files
    macs: dict                   # dense / compressed, from the ONNX graphs
    size_mb: dict                # dense / compressed file sizes
    parity: float                # largest torch-vs-ONNX logit difference
    latency: list[dict]          # one row per backend and batch, with speedup_ci
    timings: dict                # seconds per step
    notes: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)
    gate: dict = field(default_factory=lambda: {"passed": True, "checks": []})
    # dense (torch), compressed (torch), onnx, dense_onnx, before_finetune, int8, ...; None (left out of
    # report.json) for data without labels, where `agreement` is what there is
    accuracy: dict | None = None
    # top-1 agreement with the dense model on the validation split: onnx (model.onnx against dense.onnx),
    # int8 / fp16 (against dense.onnx); without labels also compressed and before_finetune (torch, against
    # the dense torch model) and engine
    agreement: dict | None = None
    # a language model's validation perplexity (next-token), dense.onnx and model.onnx, and the
    # number of tokens it was measured on
    perplexity: dict | None = None
    parity_mean: float | None = None
    parity_samples: int | None = None
    size: dict | None = None         # bytes and gzip bytes, sparse storage
    latency_env: dict | None = None  # CPU, ONNX Runtime version, provider, threads
    # the structure's own section, read back from model.onnx by its verify hook, under its name
    # (e.g. {"2:4": {...}}); rendered and gated by the structure (ticketforge.structures)
    structure: dict | None = None
    sanity: dict | None = None       # the sanity-check variants
    quantize: dict | None = None     # model.int8.onnx / model.fp16.onnx
    tensorrt: dict | None = None     # model.engine
    budget: dict | None = None       # a latency or size target and whether it was met
    # sections this version has no field for (a later version's): kept, and written back as they were
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "report") -> "Report":
        if not isinstance(data, dict):
            raise UserError(f"{where} is not a ticketforge report (expected a JSON object)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise UserError(f"{where} is not a ticketforge report: it has no {', '.join(missing)}")
        # Sections a later version adds are not an error (old readers, new reports), nor dropped.
        known = {k: v for k, v in data.items() if k in fields and k != "extra"}
        return cls(**known, extra={k: v for k, v in data.items() if k not in fields})

    def to_dict(self) -> dict:
        """For report.json: the optional sections a run did not produce are left out."""
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        return {**{k: v for k, v in out.items() if v is not None}, **extra}


def macs_text(value, section: dict) -> str:
    """A MAC count, or "unknown (why)": a count that could not be made is never shown as 0."""
    return f"{value:,}" if value is not None else f"unknown ({section.get('unknown', 'not counted')})"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def quality_rows(r: Report) -> list[list[str]]:
    """The summary's accuracy rows (label, dense, compressed): accuracy where the data has labels (a
    language model's: next-token top-1), top-1 agreement with the dense model (all there is without
    labels), and a language model's perplexity."""
    acc, agree = r.accuracy, r.agreement or {}
    rows = []
    if acc is not None:
        rows += [["accuracy (torch)", pct(acc["dense"]), pct(acc["compressed"])],
                 ["accuracy (ONNX Runtime, exported)", pct(acc.get("dense_onnx")), pct(acc["onnx"])]]
    else:
        rows.append(["top-1 agreement with dense, no labels (torch)", pct(1.0), pct(agree.get("compressed"))])
    if agree.get("onnx") is not None:
        rows.append(["top-1 agreement with dense.onnx (ONNX Runtime, exported)", pct(1.0), pct(agree["onnx"])])
    if r.perplexity:
        rows.append([f"perplexity, next token (ONNX Runtime, {r.perplexity['tokens']:,} tokens)",
                     f"{r.perplexity['dense']:.3f}", f"{r.perplexity['onnx']:.3f}"])
    return rows
