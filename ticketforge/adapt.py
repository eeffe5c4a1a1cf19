"""What real models take and return, made uniform once, at load time.

Models from libraries return a `ModelOutput` (HF transformers), a dict with `logits`, a tuple or a
namedtuple; text models take token ids and an attention mask. Every stage of ticketforge calls
`model(x)` with one tensor and wants the logits back, so the loaded model gets two forward hooks
instead of a wrapper module: the state_dict keys, the module names in reports and masks, and
`save_pretrained` stay exactly the user's. Hooks travel with `copy.deepcopy`, and tracing
(ONNX export, Torch-Pruning's dependency graph, `functional_call`) runs them like any call.

- output: the logits are taken from what the model returns (`logits_of`), and the report says
  what was unwrapped;
- inputs: a token-id batch with an attention mask travels through ticketforge as one int64 tensor
  (N, 2, L), ids then mask (ticketforge.data packs it), so every loader, search and fine-tune
  handles it as any input; the pre-hook splits it before the model sees it, passing the mask by
  keyword where the forward has an `attention_mask` parameter (HF) and second otherwise."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ticketforge import tasks
from ticketforge.errors import UserError
from ticketforge.masks import include_lm_head

MASK = "attention_mask"


def logits_of(out) -> tuple[torch.Tensor | None, str]:
    """(logits, how they were found) from what a model returned; logits None when there are none."""
    if isinstance(out, torch.Tensor):
        return out, "tensor"
    name = type(out).__name__
    if isinstance(out, Mapping):  # HF ModelOutput is an OrderedDict
        if "logits" in out and isinstance(out["logits"], torch.Tensor):
            return out["logits"], f"{name}.logits"
        return None, f"{name} without 'logits' (keys: {', '.join(map(str, out.keys())) or 'none'})"
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
        if "logits" in out._fields and isinstance(out.logits, torch.Tensor):
            return out.logits, f"{name}.logits"
    if isinstance(out, (tuple, list)):
        if out and isinstance(out[0], torch.Tensor):
            return out[0], f"{name}[0]"
        return None, f"{name} whose first element is not a tensor"
    return None, name


def _logits_hook(module, args, out):
    return logits_of(out)[0]


def _split_hook(module, args, kwargs, keyword):
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == 2):
        return None  # already split (the ONNX export feeds ids and mask as two inputs)
    ids, mask = x[:, 0], x[:, 1]
    if keyword:
        return (ids, *args[1:]), {**kwargs, keyword: mask}
    return (ids, mask, *args[1:]), kwargs


def mask_keyword(model: nn.Module) -> str | None:
    """`attention_mask` when the model's forward takes a parameter of that name, else None
    (the mask then goes second, positionally)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return MASK if MASK in params else None


def apply(model: nn.Module, io: dict) -> nn.Module:
    """Install the hooks `io` (from `fit`) describes; also on a freshly built copy of the model."""
    model.ticketforge_inputs = list(io.get("inputs", ["input"]))  # read by graph_inputs(), copies keep it
    model.ticketforge_task = io.get("task", tasks.CLASSIFY)  # read by tasks.of()
    if io.get("prune_lm_head"):  # convert.prune_lm_head (ticketforge.masks)
        include_lm_head(model, True)
    if io.get("inputs", ["input"])[1:]:
        model.register_forward_pre_hook(functools.partial(_split_hook, keyword=io.get("mask_keyword")),
                                        with_kwargs=True)
    if io.get("output", "tensor") != "tensor":
        model.register_forward_hook(_logits_hook)
    return model


def graph_inputs(model: nn.Module) -> list[str]:
    """The ONNX graph inputs an adapted model is exported with: ids and mask as two inputs where the
    data has an attention mask (the packed tensor does not trace through the split hook)."""
    return list(getattr(model, "ticketforge_inputs", ["input"]))


def graph_sample_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    """One sample of the exported graph's first input (DataBundle.graph_input_shape, from a batch):
    packed ids and mask (N, 2, L) are two inputs of (N, L) there."""
    return tuple(example.shape[2:] if len(graph_inputs(model)) == 2 else example.shape[1:])


def fit(model: nn.Module, inputs: list[str], example: torch.Tensor) -> dict:
    """Look at what the model returns for `example` and install the hooks that make it take one
    tensor and return logits. Returns the description for the report (and for `apply`). A model
    that fails on the example is left alone: the data check names that problem."""
    io = {"inputs": list(inputs), "output": "tensor"}
    if inputs[1:]:
        if isinstance(model, torch.jit.ScriptModule):
            raise UserError("a TorchScript model cannot be given an attention mask (it takes what it was scripted "
                            "with): give a state_dict with --arch, or data without attention_mask")
        io["mask_keyword"] = mask_keyword(model)
        apply(model, {"inputs": inputs, "mask_keyword": io["mask_keyword"]})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception:
        return io
    finally:
        model.train(was_training)
    logits, how = logits_of(out)
    if logits is None:
        raise UserError(f"the model must return logits of shape (batch, classes) or (batch, seq, vocab): a tensor, or a ModelOutput, dict "
                        f"or namedtuple with 'logits', or a tuple or list whose first element is them; got {how}")
    if how != "tensor":
        if isinstance(model, torch.jit.ScriptModule):
            raise UserError(f"a TorchScript model must return its logits as a tensor; this one returns {how}: "
                            "script a wrapper that returns the logits, or give a state_dict with --arch")
        io["output"] = how
        model.register_forward_hook(_logits_hook)
    return io


def inputs(names: list[str], x) -> dict[str, np.ndarray]:
    """ONNX Runtime's inputs for one batch as ticketforge holds it: float32 images or features,
    int64 token ids, and a packed attention mask (N, 2, L: ids, mask; ticketforge.adapt) split into
    the graph's second input."""
    x = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = x.astype(np.int64 if x.dtype.kind in "iub" else np.float32, copy=False)
    if len(names) == 2:
        return {names[0]: np.ascontiguousarray(x[:, 0]), names[1]: np.ascontiguousarray(x[:, 1])}
    return {names[0]: x}
