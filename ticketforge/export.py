"""ONNX export: one self-contained file with a dynamic batch axis, checked by onnx.checker."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

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


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, cfg: ExportConfig) -> Path:
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    try:
        with quiet_exporter(), torch.no_grad():
            if cfg.exporter == "dynamo":
                torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                                  input_names=["input"], output_names=["logits"], opset_version=max(cfg.opset, 18),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
            else:
                torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                                  output_names=["logits"], opset_version=cfg.opset, do_constant_folding=True,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:
        raise UserError(f"ONNX export ({cfg.exporter}) failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    stray = Path(str(path) + ".data")
    if stray.exists():  # the dynamo exporter may still split weights out; fold them back in
        m = onnx.load(str(path))
        onnx.save_model(m, str(path), save_as_external_data=False)
        os.remove(stray)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"onnx.checker rejects the exported {path.name}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'invalid model'}") from None
    return path
