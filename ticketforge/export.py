"""ONNX export: one self-contained file with a dynamic batch axis, checked by onnx.checker."""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ticketforge import tasks
from ticketforge.errors import UserError, VerificationError
from ticketforge.recipe import ExportConfig


@contextlib.contextmanager
def quiet_exporter():
    """The exporters print progress and deprecation warnings; keep them out of the tool's output."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


class SplitInputs(nn.Module):
    """Token ids and attention mask as two graph inputs, named as the data names them; inside, they
    are packed (N, 2, L) as everywhere else, and the model's hook unpacks them (ticketforge.adapt)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input, attention_mask):
        return self.model(torch.stack((input, attention_mask), 1))


class OneInput(nn.Module):
    """The model called with its one input only. The TorchScript exporter fills every parameter the
    forward does not get with its default, and traces an int default as a graph input (HF causal
    LMs' `logits_to_keep=0` became a required input that selects one position)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input):
        return self.model(input)


def _more_parameters(model: nn.Module, count: int) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) > count


@contextlib.contextmanager
def traceable(model: nn.Module):
    """An HF transformers model made to trace what it computes. Its attention runs as plain ops
    ("eager"): the TorchScript exporter drops SDPA's `is_causal` (a causal LM's exported graph let
    every token see the later ones) and cannot convert grouped-query SDPA. And HF's check for
    sequences packed into one row (positions restarting inside a row) is skipped: ticketforge feeds
    one sequence per row, positions 0..L-1 (the check traces into `aten::diff`, which opset 17 has
    not). `model` is the exporter's own copy, changed in place."""
    from ticketforge import hf

    if not hf.is_model(model):
        yield model
        return
    from unittest import mock

    from transformers import masking_utils

    with contextlib.suppress(Exception):  # a model that has one attention implementation only
        model.set_attn_implementation("eager")
    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield model


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, cfg: ExportConfig,
                inputs: list[str] | tuple[str, ...] = ("input",)) -> Path:
    """`inputs`: the graph's input names, ticketforge.data.DataBundle.inputs (the model's output is
    always one tensor named `logits`)."""
    path = Path(path)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules()):
        # torch's exporters cannot write batch statistics at inference, and a deployed model runs at batch 1.
        raise UserError("ONNX export: the model has BatchNorm layers without running statistics (e.g. the built-in "
                        "resnet20-tlab by default); build it with running statistics (--arch-kwargs "
                        "'{\"running_stats\": true}') to export it")
    sequence = tasks.sequence(tasks.of(model))  # logits (batch, seq, vocab): the sequence axis is dynamic too
    exporter = cfg.exporter if cfg.exporter != "auto" else "dynamo" if sequence else "torchscript"
    model = inner = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    args = (example,)
    if len(inputs) == 2:
        model, args = SplitInputs(model), (example[:, 0], example[:, 1])
    elif _more_parameters(model, 1):
        model = OneInput(model)
    names = list(inputs)
    axes = {0: "batch", 1: "seq"} if sequence else {0: "batch"}
    try:
        with quiet_exporter(), torch.no_grad(), traceable(inner):
            if exporter == "dynamo":
                dims = {i: torch.export.Dim(n) for i, n in axes.items()}
                torch.onnx.export(model, args, str(path), dynamo=True, external_data=False,
                                  input_names=names, output_names=["logits"], opset_version=max(cfg.opset, 18),
                                  dynamic_shapes=tuple(dims for _ in args))
            else:
                torch.onnx.export(model, args, str(path), dynamo=False, input_names=names,
                                  output_names=["logits"], opset_version=cfg.opset, do_constant_folding=True,
                                  dynamic_axes={**{n: axes for n in names}, "logits": axes})
    except Exception as exc:
        raise UserError(f"ONNX export ({exporter}) failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    m = onnx.load(str(path))  # loads external data too, if the exporter split it out
    stray = Path(str(path) + ".data")
    if stray.exists():
        os.remove(stray)
    undo_weight_sharing(m)
    onnx.save_model(m, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"onnx.checker rejects the exported {path.name}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'invalid model'}") from None
    return path


def export_dense_copy(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """A copy of `model` exported on the CPU with every weight stored dense: what the budgets'
    cost models measure and size (the model itself is left as it was)."""
    from ticketforge.adapt import graph_inputs

    export_onnx(copy.deepcopy(model).cpu().eval(), example[:2].cpu(), path, ExportConfig(sparse_storage="never"),
                graph_inputs(model))
    return Path(path)


def undo_weight_sharing(m: onnx.ModelProto) -> None:
    """The exporter merges identical initializers (e.g. two fully pruned convs, all zeros) behind
    Identity nodes. Give every layer its own weight again, so the file says what each layer holds
    and anyone counting initializers counts each layer once."""
    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            m.graph.initializer.append(copy_)
        else:
            keep.append(node)
    if len(keep) != len(m.graph.node):
        del m.graph.node[:]
        m.graph.node.extend(keep)
        used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        alive = [i for i in m.graph.initializer if i.name in used]
        del m.graph.initializer[:]
        m.graph.initializer.extend(alive)
