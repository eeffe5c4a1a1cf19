"""Recipes: the one schema every recipe (built-in YAML, user YAML, --set overrides) is checked by.

Each section is a dataclass; each field carries its help text and its allowed values or range
in `metadata`, so defaults, documentation and validation have one source (as open_lth does).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from ticketforge.errors import UserError


def _structure_names() -> list[str]:
    """The registered structures: the schema's choices for convert.structure come from the registry."""
    from ticketforge.structures import STRUCTURES

    return STRUCTURES.names()


def opt(default, help: str, *, choices=None, lo=None, hi=None, lo_open=False, hi_open=False, unset=None):
    """A schema field: default, help text and the allowed values or range; `unset`: a value that
    means the key is not set (a count of 0 that defers to another key)."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "unset": unset}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SearchConfig:
    method: str = opt("magnitude", "search method, by registry name (ticketforge.search.METHODS); each reads "
                      "only some of the keys below, and a key it does not read is an error")
    sparsity: float = opt(0.9, "fraction of prunable weights removed", lo=0.0, hi=1.0, hi_open=True)
    target_macs: float = opt(0.5, "channels / blocks: fraction of the dense MACs kept", lo=0.0, hi=1.0, lo_open=True)
    blocks: int = opt(0, "blocks: number of residual blocks to remove (0: use target_macs)", lo=0, unset=0)
    start: str = opt("trained", "where the search starts: on the trained weights, at a rewind point "
                     "after a short re-training from a fresh init, or at a fresh init",
                     choices=["trained", "rewind", "init"])
    epochs: float = opt(4.0, "search length in epochs (CTS, IMP rounds: per round)", lo=0.0)
    steps: int = opt(0, "search length in optimizer steps; overrides epochs when > 0", lo=0)
    min_steps: int = opt(0, "CTS: search at least this many steps whatever the data set's size (each step draws "
                         "one mask sample; the logits need a number of them, not of epochs)", lo=0)
    lr: float = opt(0.1, "learning rate of the mask logits (CTS: Adam)", lo=0.0, lo_open=True)
    batch_size: int = opt(128, "batch size of the search", lo=1)
    objective: str = opt("reverse_kl", "CTS objective", choices=["reverse_kl", "forward_kl", "ce"])
    temperature: float = opt(2 / 3, "CTS Binary Concrete temperature", lo=0.0, lo_open=True)
    prior: str = opt("none", "CTS: where the gate logits start. none: every gate at the target density (the "
                     "paper); magnitude: shifted by each unit's magnitude rank within its layer (logit of the rank's "
                     "quantile), so the search starts from a magnitude ticket and refines it",
                     choices=["none", "magnitude"])
    balance: str = opt("gradbalance", "CTS sparsity control", choices=["gradbalance", "lagrange"])
    budget_slack: float = opt(1.1, "CTS: the balance aims at this multiple of the kept budget", lo=1.0)
    scope: str = opt("lamp", "magnitude: how weights of different layers compare. lamp: each weight's share of "
                     "its layer's remaining energy (Lee et al. 2021; spreads sparsity so that no layer starves); "
                     "global: raw |w| across all layers", choices=["lamp", "global"])
    prune_fraction: float = opt(0.2, "IMP: fraction of the remaining weights removed per round",
                                lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    synflow_rounds: int = opt(100, "SynFlow: pruning rounds (exponential schedule)", lo=1)
    calibration_samples: int = opt(128, "wanda, sparsegpt, similarity: training samples run through the model "
                                   "(no gradients, search.batch_size at a time) to measure the layers' inputs", lo=1)
    stop_overlap: float = opt(0.999, "CTS: stop once successive top-k sets of the logits overlap more than this "
                              "for stop_window checks (epochs/steps are then the cap); 1: never stop early",
                              lo=0.0, hi=1.0, lo_open=True)
    stop_window: int = opt(5, "CTS: checks in a row the top-k set must hold", lo=1)
    check_every: int = opt(0, "CTS: steps between checks of the top-k set (0: a quarter epoch)", lo=0)
    stages: int = opt(1, "CTS: reach the sparsity in this many stages of geometrically falling density, each a "
                      "search among the survivors (the search length split between them) and, between stages, "
                      "stage_epochs of fine-tuning of the surviving weights (as IMP's rounds adapt them to each cut)",
                      lo=1)
    stage_epochs: int = opt(1, "CTS with stages > 1: fine-tune epochs (the finetune section's optimizer and lr) "
                            "between two stages", lo=0)
    min_per_output: int = opt(0, "CTS: keep at least this many weights of every output unit (a conv's output "
                              "channel, a Linear's row: no dead class, no dead stem channel), the highest-scored "
                              "of each; the rest by global top-k", lo=0)
    checkpoint: bool = opt(False, "CTS on weights: recompute the activations of each layer of the model's "
                           "nn.ModuleList containers (a transformer's layers) in the backward pass instead of keeping "
                           "them: the search then holds one layer's activations, not all, for a second forward of "
                           "each layer (BERT-base on CPU: 4-10% more time per step; docs/memory.md)")
    sanity: bool = opt(False, "also train the sanity-check variants (shuffled, inverted, re-initialised)")
    # Budgets users think in (ticketforge.budget): each replaces sparsity / target_macs / blocks.
    target_speedup: Optional[float] = opt(None, "channels / blocks: measured speed-up of model.onnx over dense.onnx "
                                          "(ONNX Runtime, at validate.budget_batch)", lo=1.0, lo_open=True)
    target_latency_ms: Optional[float] = opt(None, "channels / blocks: measured median latency of model.onnx in ms "
                                             "(ONNX Runtime, at validate.budget_batch)", lo=0.0, lo_open=True)
    max_size_mb: Optional[float] = opt(None, "size of the deployed file in MB (model.onnx with sparse storage, or "
                                       "model.int8.onnx with export.quantize int8)", lo=0.0, lo_open=True)
    budget_margin: float = opt(0.1, "latency budgets: the search aims this fraction beyond the target, for what its "
                               "latency table does not predict; the verify step then times the export", lo=0.0)
    measure_rounds: int = opt(3, "latency budgets, channels: times the selection is exported, timed against dense and "
                              "re-selected for the measured error of the latency table, before the fine-tune "
                              "(0: trust the table)", lo=0)


@dataclass
class TrainConfig:
    """Training from a fresh init, for search.start = rewind or init."""

    epochs: int = opt(10, "total training epochs of the schedule", lo=1)
    rewind_epochs: float = opt(1.0, "rewind: epochs of dense training before the search", lo=0.0)
    rewind_steps: int = opt(0, "rewind: optimizer steps of dense training before the search; overrides "
                            "rewind_epochs when > 0 (rewinding to an iteration, as open_lth does)", lo=0)
    rewind_accuracy: float = opt(0.0, "rewind: instead of a fixed point, rewind to the first step where the network's "
                                 "validation accuracy reaches this fraction of the given trained model's (checked "
                                 "every rewind_check steps); 0: off (rewind_steps / rewind_epochs decide)",
                                 lo=0.0, hi=1.0)
    rewind_check: int = opt(0, "rewind_accuracy: optimizer steps between accuracy checks (0: an eighth of an epoch)",
                            lo=0)
    lr: float = opt(0.1, "SGD learning rate", lo=0.0, lo_open=True)
    batch_size: int = opt(128, "batch size", lo=1)
    momentum: float = opt(0.9, "SGD momentum", lo=0.0, hi=1.0)
    weight_decay: float = opt(5e-4, "weight decay", lo=0.0)


@dataclass
class FinetuneConfig:
    epochs: int = opt(5, "fine-tune epochs (the --epochs option)", lo=0)
    lr: float = opt(0.01, "peak learning rate (cosine schedule)", lo=0.0, lo_open=True)
    batch_size: int = opt(128, "batch size", lo=1)
    optimizer: str = opt("sgd", "optimizer", choices=["sgd", "adamw"])
    momentum: float = opt(0.9, "SGD momentum", lo=0.0, hi=1.0)
    weight_decay: float = opt(5e-4, "weight decay", lo=0.0)
    grad_clip: float = opt(2.0, "gradient-norm clip (0: off)", lo=0.0)
    bn_recalibrate: bool = opt(True, "re-estimate BatchNorm statistics after every mask change")
    distill: float = opt(0.5, "weight w of distillation from the dense model in every fine-tune and ticket retraining "
                         "(IMP rounds, the rest of a rewind schedule): loss = (1 - w) CE + w T^2 KL(dense || ticket), "
                         "T = distill_temperature; 0: labels only. Data without labels always uses 1. Default measured "
                         "in docs/distillation.md", lo=0.0, hi=1.0)
    distill_temperature: float = opt(2.0, "distillation temperature T: both models' logits are divided by it before "
                                     "the softmax", lo=0.0, lo_open=True)
    recover_epochs: int = opt(1, "budgets: when the verify step removes more to meet a missed budget, fine-tune the "
                              "ticket this many epochs again (these settings, a fresh cosine schedule) before it is "
                              "converted and measured; 0: not (what was removed costs accuracy)", lo=0)


@dataclass
class ConvertConfig:
    structure: str = opt("unstructured", "what the ticket becomes, by registry name (`ticketforge structures`): "
                         "scattered zeros, N:M sparsity, removed channels, removed residual blocks, ...",
                         choices=lambda: _structure_names())
    round_to: int = opt(16, "channels: keep multiples of this many channels (runtime vector width)", lo=1)
    nm_decay: str = opt("none", "2:4 fine-tune: hard mask, or pruned weights decayed to zero "
                        "(Progressive Gradient Flow)", choices=["none", "exponential"])
    prune_lm_head: bool = opt(False, "unstructured, N:M: prune a language model's output embedding (its LM head) too; "
                              "a head tied to the input embedding is never pruned")


@dataclass
class ExportConfig:
    targets: list = opt(["onnx"], "what to build", choices=["onnx", "tensorrt"])
    exporter: str = opt("auto", "torch.onnx exporter (torchscript: fast and forgiving; dynamo: torch.export; auto: "
                        "dynamo for language models and token classifiers, whose traced sequence length and batch "
                        "torchscript bakes into HF attention masks, torchscript for the rest)",
                        choices=["auto", "torchscript", "dynamo"])
    opset: int = opt(17, "ONNX opset", lo=13)
    quantize: str = opt("none", "also write a quantized model", choices=["none", "int8", "fp16"])
    trt_batch: list = opt([1, 64, 256], "TensorRT optimization profile: min, opt, max batch")
    sparse_storage: str = opt("auto", "store mostly-zero weights as ONNX sparse initializers: where the file gets "
                              "smaller, always, or never (ONNX Runtime densifies them at load)",
                              choices=["auto", "always", "never"])


@dataclass
class ValidateConfig:
    latency_batches: list = opt([1, 64], "batch sizes timed")
    repeats: int = opt(100, "timed pairs (dense and compressed, interleaved) per batch before the interval may "
                       "stop the timing (fewer only if max_seconds comes first)", lo=3)
    warmup: int = opt(5, "untimed runs first", lo=0)
    ci_target: float = opt(0.03, "time until the speed-up's 95% interval is within +- this fraction", lo=0.0,
                           lo_open=True)
    max_seconds: float = opt(5.0, "time cap per latency row: stop here even if the interval is still wider",
                             lo=0.0, lo_open=True)
    threads: int = opt(1, "ONNX Runtime intra-op threads while timing (fixed, so that numbers compare across "
                       "machines; 0: every core of this one)", lo=0)
    budget_batch: Optional[int] = opt(None, "batch size a latency budget (search.target_speedup, target_latency_ms) "
                                      "is taken at, one of latency_batches; unset: the largest", lo=1)
    budget_threads: int = opt(0, "ONNX Runtime intra-op threads a latency budget is measured with (its latency table "
                              "too); 0: every core, ONNX Runtime's own default and what a plain InferenceSession "
                              "gets, so the budget holds where the model is deployed", lo=0)
    budget_rounds: int = opt(3, "budgets: at most this many times the verify step removes more and re-measures "
                             "when the exported model misses its budget", lo=0)
    plain_runs: int = opt(30, "timed budgets: also time the final pair as a user's own code would (one default "
                          "InferenceSession per file, this many alternating runs, medians; report.json budget.plain); "
                          "0: not", lo=0)
    parity_tol: float = opt(1e-3, "max abs logit difference allowed between torch and ONNX", lo=0.0, lo_open=True)


@dataclass
class GateConfig:
    max_accuracy_drop: Optional[float] = opt(None, "dense accuracy minus exported ONNX accuracy, at most; for data "
                                             "without labels, 1 minus the exported model's top-1 agreement with "
                                             "dense.onnx")
    min_speedup: Optional[float] = opt(None, "speed-up over dense, at least, checked on the low end of its 95% "
                                       "interval (every backend and batch, or gate.batch)")
    max_latency_ms: Optional[float] = opt(None, "latency of the exported model, at most, checked on the high end of "
                                          "its 95% interval (every backend and batch, or gate.batch)")
    min_plain_speedup: Optional[float] = opt(None, "timed budgets: the speed-up a plain session measures "
                                             "(budget.plain, validate.plain_runs), at least", lo=0.0)
    max_perplexity_ratio: Optional[float] = opt(None, "language models: the exported model's validation perplexity "
                                                "over dense.onnx's, at most (1.1 = 10% higher)", lo=1.0)
    max_size_mb: Optional[float] = opt(None, "size of model.onnx in MB, at most", lo=0.0)
    min_sparsity: Optional[float] = opt(None, "achieved sparsity, at least", lo=0.0, hi=1.0)
    batch: Optional[int] = opt(None, "check min_speedup and max_latency_ms only at this batch size (one of "
                               "validate.latency_batches); unset: at every batch", lo=1)


@dataclass
class DataConfig:
    """How an image folder or a text file becomes tensors; other data is used as given."""

    resize: int = opt(224, "image folders: resize the shorter side to this many pixels", lo=1)
    crop: int = opt(224, "image folders: then center-crop a square of this size (at most resize)", lo=1)
    mean: list = opt([0.485, 0.456, 0.406], "image folders: per-channel (RGB) mean subtracted after scaling to [0, 1]")
    std: list = opt([0.229, 0.224, 0.225], "image folders: per-channel (RGB) standard deviation divided by")
    cache_mb: int = opt(2048, "image folders: decoded images kept in memory, at most this many MiB", lo=0)
    workers: int = opt(2, "image folders: threads decoding into the cache, and loader processes for what "
                       "does not fit it", lo=0)
    seq_len: int = opt(128, "text files (--data FILE.txt, a language model): tokens per sequence; the text is "
                       "tokenized with the model folder's tokenizer.json and cut into sequences of this length", lo=2)


@dataclass
class Recipe:
    name: str = opt("custom", "recipe name")
    description: str = opt("", "one line for `ticketforge recipes`")
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation

def choices_of(meta) -> list | None:
    """A field's allowed values: a list, or a callable that returns one (a registry's names)."""
    choices = meta.get("choices")
    return choices() if callable(choices) else choices


def _coerce(path: str, value: Any, tp, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0], meta)
    if tp in (int, float) and isinstance(value, str):
        try:  # PyYAML reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"recipe key '{path}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"recipe key '{path}': expected an integer, got {value!r}")
        value = int(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"recipe key '{path}': expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise UserError(f"recipe key '{path}': expected a finite number, got {value!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise UserError(f"recipe key '{path}': expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise UserError(f"recipe key '{path}': expected a string, got {value!r}")
    elif tp is list:
        if not isinstance(value, list):
            value = [value]
        choices = choices_of(meta)
        for item in value:
            if choices and item not in choices:
                raise UserError(f"recipe key '{path}': {item!r} is not one of {', '.join(map(str, choices))}")
        if path == "export.trt_batch" and (len(value) != 3 or not all(isinstance(v, int) and v >= 1 for v in value)
                                           or sorted(value) != value):
            raise UserError(f"recipe key '{path}': expected [min, opt, max] positive integers in order, got {value!r}")
        if path == "validate.latency_batches" and (not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                        and v >= 1 for v in value)):
            raise UserError(f"recipe key '{path}': expected a list of positive batch sizes, got {value!r}")
        if path in ("data.mean", "data.std") and (
                len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) and (v > 0 or path == "data.mean") for v in value)):
            raise UserError(f"recipe key '{path}': expected 3 finite numbers (R, G, B){', each > 0' if path == 'data.std' else ''}, "
                            f"got {value!r}")
        return value
    choices = choices_of(meta)
    if choices and value not in choices:
        raise UserError(f"recipe key '{path}': {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise UserError(f"recipe key '{path}': {value!r} is out of range ({_range(meta)})")
    if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
        raise UserError(f"recipe key '{path}': {value!r} is out of range ({_range(meta)})")
    return value


def _range(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    if hi is None:
        return f"must be {'>' if meta.get('lo_open') else '>='} {lo}"
    return f"must be in {left}{lo}, {hi}{right}"


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"recipe section '{prefix or 'top level'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in section '{prefix}'" if prefix else "at the top level"
        raise UserError(f"unknown recipe key '{(prefix + '.') if prefix else ''}{unknown[0]}' {where}; "
                        f"allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
        else:
            kwargs[name] = _coerce(path, value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def validate(data: dict) -> Recipe:
    """Check a recipe mapping against the schema, the search method's keys and the structure's
    rules, and return the resolved Recipe."""
    from ticketforge import structures
    from ticketforge.search import COMMON_KEYS, METHODS, RENAMED

    data = _unalias(data or {})
    method = (data.get("search") or {}).get("method") if isinstance(data.get("search"), dict) else None
    if isinstance(method, str) and method in RENAMED:
        raise UserError(f"recipe key 'search.method': '{method}' is now called '{RENAMED[method]}'; rename it")
    recipe = _build(Recipe, data, "")
    method = METHODS.get(recipe.search.method, "recipe key 'search.method'")
    structure = structures.get(recipe.convert.structure)
    recipe.source = copy.deepcopy(data)  # what the user wrote: variants (a sweep's points) re-validate from it
    structure.check(recipe)
    # A key the chosen method and structure do not read is a mistake, not a setting: say so.
    given = data.get("search") or {}
    used = set(COMMON_KEYS) | set(structure.method_keys(method)) | set(structure.search_keys(method))
    for key in given:
        if key not in used:
            raise UserError(f"recipe key 'search.{key}' is not used by search method '{method.name}' with "
                            f"structure '{structure.name}' (they read: {', '.join(sorted(used))}); remove it")
    for key in data.get("convert") or {}:
        if key != "structure" and key not in structure.convert_keys:
            raise UserError(f"recipe key 'convert.{key}' is not used by structure '{structure.name}'; remove it")
    if recipe.data.crop > recipe.data.resize:
        raise UserError(f"recipe keys 'data.crop' and 'data.resize': the center crop ({recipe.data.crop}) must fit in "
                        f"the resized image ({recipe.data.resize})")
    starts = structure.starts(method)
    if recipe.search.start not in starts:
        raise UserError(f"recipe key 'search.start': search method '{method.name}' on structure '{structure.name}' "
                        f"honours {', '.join(starts)}; got '{recipe.search.start}'")
    if recipe.gate.batch is not None and recipe.gate.batch not in recipe.validate.latency_batches:
        raise UserError(f"recipe key 'gate.batch': {recipe.gate.batch} is not timed; validate.latency_batches is "
                        f"{recipe.validate.latency_batches}")
    return recipe


def _unalias(data: dict) -> dict:
    """A method name of an earlier version (`cts-2to4`) is that method on its structure."""
    from ticketforge.search import ALIASES

    search = data.get("search")
    method = search.get("method") if isinstance(search, dict) else None
    if not isinstance(method, str) or method not in ALIASES:
        return data
    name, structure = ALIASES[method]
    convert = data.get("convert") if isinstance(data.get("convert"), dict) else {}
    if convert.get("structure", structure) != structure:
        raise UserError(f"recipe key 'search.method': '{method}' is method '{name}' on structure '{structure}', "
                        f"but convert.structure is '{convert['structure']}'; write search.method: {name}")
    data = copy.deepcopy(data)
    data["search"]["method"] = name
    data.setdefault("convert", {})
    if isinstance(data["convert"], dict):
        data["convert"]["structure"] = structure
    return data


def with_value(recipe: Recipe, key: str, value: Any) -> Recipe:
    """The recipe with `key` (a dotted path) set to `value`, checked by the schema like any recipe."""
    data = copy.deepcopy(getattr(recipe, "source", None) or recipe.to_dict())
    apply_override(data, key.split("."), value)
    return validate(data)


# ---------------------------------------------------------------- loading and overrides

# Built-in recipes known under an earlier name.
ALIASES = {"layers": "cts-blocks"}


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ticketforge.recipes").iterdir() if p.name.endswith(".yaml"))


class _Loader(yaml.SafeLoader):
    """Safe YAML, read the way a user means it: 2:4 is an N:M pattern (not the base-60 number 124
    of YAML 1.1) and 1e-5 is a number (YAML 1.1 wants 1.0e-5), as in YAML 1.2."""

    def construct_yaml_int(self, node):
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {where} must be a mapping of sections, got {type(data).__name__}")
    return data


def builtin_text(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in builtin_names():
        raise UserError(f"unknown recipe {name!r}; built-in recipes: {', '.join(builtin_names())}")
    return resources.files("ticketforge.recipes").joinpath(f"{name}.yaml").read_text()


def load_raw(name_or_path: str) -> dict:
    """The recipe as a plain mapping (built-in name or YAML path), before overrides."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {name_or_path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read recipe file {name_or_path}: {exc}") from None
        data = _read_yaml(text, name_or_path)
        data.setdefault("name", path.stem)
        return data
    data = _read_yaml(builtin_text(name_or_path), name_or_path)
    data.setdefault("name", name_or_path)
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (["key", "path"], value); the value is read as YAML (1, 0.5, true, [1, 2], text)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise UserError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return [k.strip() for k in keys], value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {'.'.join(keys)}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def resolve(name_or_path: str, sets: list[str] = (), **shortcuts) -> Recipe:
    """Load a recipe, apply --set items then the named shortcuts (sparsity=..., epochs=...), validate."""
    data = load_raw(name_or_path)
    base = copy.deepcopy(data)
    given = []
    for item in sets:
        keys, value = parse_set(item)
        apply_override(data, keys, value)
        given.append(keys)
    paths = {"sparsity": ["search", "sparsity"], "epochs": ["finetune", "epochs"]}
    for name, value in shortcuts.items():
        if value is not None:
            apply_override(data, paths[name], value)
            given.append(paths[name])
    if ALIASES.get(name_or_path, name_or_path) in builtin_names():
        data = _unalias(data)
        _drop_builtin_leftovers(data, _unalias(base), given)
    return validate(data)


def _drop_builtin_leftovers(data: dict, base: dict, given: list[list[str]]) -> None:
    """`--recipe cts --set search.method=magnitude`: the built-in recipe's settings for its own
    method (objective, temperature, ...) are not the user's, so they go instead of being refused.
    Whatever the user set themselves is still checked strictly."""
    from ticketforge import structures
    from ticketforge.search import COMMON_KEYS, METHODS

    search, convert = data.get("search"), data.get("convert")
    if not isinstance(search, dict) or not isinstance(convert, dict | type(None)):
        return
    method, structure = search.get("method"), (convert or {}).get("structure", ConvertConfig.structure)
    if method not in METHODS or structure not in structures.STRUCTURES:
        return  # validate() names the problem
    # A budget the user gives replaces the built-in recipe's (cts-channels' target_macs 0.5 under
    # --set search.target_speedup=2): a run has one budget, and only the user's counts as given.
    choosable = structures.get(structure).choosable()
    if any(["search", k] in given for k in choosable):
        for key in [k for k in choosable if k in search and ["search", k] not in given]:
            del search[key]
    if method == base.get("search", {}).get("method") and structure == base.get("convert", {}).get(
            "structure", ConvertConfig.structure):
        return
    chosen, target = METHODS.get(method), structures.get(structure)
    used = set(COMMON_KEYS) | set(target.method_keys(chosen)) | set(target.search_keys(chosen))
    for key in [k for k in search if k not in used and ["search", k] not in given]:
        del search[key]
    for key in [k for k in (convert or {}) if k != "structure" and ["convert", k] not in given
                and k not in structures.get(structure).convert_keys]:
        del convert[key]
