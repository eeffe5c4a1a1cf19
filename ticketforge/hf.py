"""Hugging Face transformers models: a `save_pretrained` folder as MODEL, a model rebuilt from its
config (a ticket of an HF model, a fresh init for rewind starts), and the compressed model written
back as a folder where its shapes did not change.

transformers is an optional extra (`pip install 'ticketforge[hf]'`). Nothing here downloads: a
folder is loaded with `local_files_only`, and a model is built from a config, never from a hub name.
Weights are read from `model.safetensors` (safe by construction); a `pytorch_model.bin` is a pickle
and is only read with --trust-pickle."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ticketforge.errors import UserError

INSTALL = "pip install 'ticketforge[hf]'"
SAFE = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_FILES = SAFE + PICKLED


def require():
    """The transformers module, or a clear error naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"this model needs Hugging Face transformers, which is not installed: {INSTALL}") from None
    # Its load report and progress bars are ours to give, in one line.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def is_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def is_model(model: nn.Module) -> bool:
    """An HF PreTrainedModel (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _class(T, config, where: str):
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise UserError(f"{where}: config.json names no architectures, so the model class is unknown "
                        "(save the model with save_pretrained, which records it)")
    cls = getattr(T, archs[0], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, T.PreTrainedModel):
        raise UserError(f"{where}: config.json names architecture {archs[0]!r}, which transformers "
                        f"{T.__version__} does not have (custom code is never run)")
    return cls


def load_folder(path: Path, trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """(model in eval mode, its config as plain data) from a save_pretrained folder, offline."""
    T = require()
    try:
        config = T.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise UserError(f"{path}/config.json does not load as a transformers config: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    cls = _class(T, config, str(path))
    safe = any((path / f).is_file() for f in SAFE)
    if not safe:
        if not any((path / f).is_file() for f in PICKLED):
            raise UserError(f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
        if not trust_pickle:
            raise UserError(f"{path} holds its weights as pytorch_model.bin, a pickle: loading it could run code "
                            "from the file. Pass --trust-pickle only if you trust who made it, or re-save the "
                            "model with save_pretrained(safe_serialization=True) (model.safetensors).")
    try:
        model, info = cls.from_pretrained(str(path), config=config, local_files_only=True, use_safetensors=safe,
                                          dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise UserError(f"{path}: the weights do not load into {cls.__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    if getattr(model.config, "use_cache", False):
        # The whole-sequence forward is what is searched, trained and exported; a KV cache would only
        # add past_key_values to every output (and to the ONNX graph). save_folder turns it back on.
        model.config.use_cache = False
    problems = [f"{k.replace('_', ' ')} {list(v)[:5]}{' ...' if len(v) > 5 else ''}"
                for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if problems:
        raise UserError(f"{path}: the weights do not fit {cls.__name__} as config.json describes it: {'; '.join(problems)}")
    return linear_layers(model.eval()), config_dict(model)


def config_dict(model: nn.Module) -> dict:
    """The model's config as plain JSON data (what a ticket stores to rebuild it)."""
    return json.loads(model.config.to_json_string(use_diff=False))


def build(config: dict) -> nn.Module:
    """A freshly initialised model from a config (`config_dict`); no weights are read."""
    T = require()
    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise UserError("the stored transformers config has no model_type")
    try:
        cfg = T.AutoConfig.for_model(model_type, **data)
    except Exception as exc:
        raise UserError(f"the stored transformers config does not load: {type(exc).__name__}: {exc}") from None
    return linear_layers(_class(T, cfg, "the stored transformers config")._from_config(cfg, dtype=torch.float32).eval())


class LinearFromConv1D(nn.Linear):
    """An nn.Linear that was a transformers `Conv1D` (GPT-2's layers: y = x @ W + b with W stored
    (in, out)); `save_folder` writes it back as one."""


def linear_layers(model: nn.Module) -> nn.Module:
    """Every transformers `Conv1D` replaced by the nn.Linear it equals (weight transposed), in place.
    Done once, where an HF model is loaded or built (so a ticket's weights, saved in this layout,
    load back), rather than teaching a second weight layout to everything that reads a layer: the
    masks (which weights are prunable, N:M groups along the input axis), Torch-Pruning's dependency
    graph and prune functions, the MAC counts, and the 2:4 read-back from the exported ONNX."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            lin = LinearFromConv1D(mod.nx, mod.nf, device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                lin.bias.copy_(mod.bias)
            lin.weight.requires_grad_(mod.weight.requires_grad)
            model.set_submodule(name, lin)
    return model


def _conv1d_layers(model: nn.Module) -> nn.Module:
    """The inverse of `linear_layers`, in place: what transformers' own classes load."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LinearFromConv1D):
            conv = Conv1D(mod.out_features, mod.in_features).to(mod.weight.device, mod.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(mod.weight.t())
                conv.bias.copy_(mod.bias)
            model.set_submodule(name, conv)
    return model


def _shapes(cls, config) -> dict[str, tuple]:
    """The state_dict shapes of `cls` built from `config` (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = linear_layers(cls._from_config(config, dtype=torch.float32))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _drop_removed_layers(model: nn.Module) -> None:
    """Removed decoder layers out of the layer list, in place; the config's layer count and per-layer
    list (`layer_types`) and the layers' own `layer_idx` follow."""
    from ticketforge.structures.blocks.residual import RemovedBlock, passes_input

    config = model.config
    for name, layers in list(model.named_modules()):
        if not isinstance(layers, nn.ModuleList) or not any(isinstance(m, RemovedBlock) for m in layers):
            continue
        if len(layers) != getattr(config, "num_hidden_layers", None):
            raise UserError(f"{name} holds removed blocks but is not the model's list of layers")
        if not all(passes_input(m) for m in layers if isinstance(m, RemovedBlock)):
            raise UserError("a removed block keeps layers of its own (a post-norm block's LayerNorm), which no "
                            "transformers config describes")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise UserError("the attention scaling depends on each layer's index "
                            "(scale_attn_by_inverse_layer_idx), which renumbering the kept layers would change")
        kept = [i for i, m in enumerate(layers) if not isinstance(m, RemovedBlock)]
        for new, old in enumerate(kept):
            for m in layers[old].modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new
        model.set_submodule(name, nn.ModuleList([layers[i] for i in kept]))
        if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(layers):
            config.layer_types = [config.layer_types[i] for i in kept]
        config.num_hidden_layers = len(kept)


def _read_widths(model: nn.Module, dense: dict[str, tuple]) -> None:
    """The config's head counts and MLP width set from the layers, where every layer has the same."""
    from ticketforge.structures.channels.heads import describe

    config = model.config
    found = {(a.heads, a.kv_heads, a.head_dim) for m in model.modules() if (a := describe(m)) is not None}
    if len(found) > 1:
        raise UserError(f"its attention layers kept different numbers of heads {sorted(found)}; a transformers "
                        "config has one number for every layer")
    if found:
        heads, kv, d = found.pop()
        if heads != config.num_attention_heads or kv != getattr(config, "num_key_value_heads", kv):
            config.num_attention_heads = heads
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = kv
            if hasattr(config, "head_dim"):  # else it would be recomputed as hidden_size / heads
                config.head_dim = d
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in ("intermediate_size", "n_inner"):
        if not hasattr(config, key):
            continue
        old = getattr(config, key) or 4 * config.hidden_size  # GPT-2's n_inner: None means 4 x n_embd
        widths = {shapes[k][axis] for k, shape in dense.items() if k in shapes and len(shape) == 2
                  for axis in (0, 1) if shape[axis] == old}
        if len(widths) > 1:
            raise UserError(f"its MLPs kept different widths {sorted(widths)}; a transformers config has one "
                            f"{key} for every layer")
        if widths and widths != {old}:
            setattr(config, key, widths.pop())


def transformers_model(model: nn.Module) -> nn.Module:
    """A copy of `model` as its transformers class builds it from a config: Conv1D layers back,
    removed decoder layers dropped (blocks), head counts and MLP width read from the layers
    (channels). Raises UserError where no config of the class describes it: layers that kept
    different widths, a removed post-norm block, or heads of a model whose head width follows from
    the head count (GPT-2: n_embd / n_head)."""
    model = copy.deepcopy(model).cpu()
    cls = type(model)
    _drop_removed_layers(model)
    _read_widths(model, _shapes(cls, model.config))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        got = _shapes(cls, model.config)
    except Exception as exc:  # the class refuses the config (GPT-2: n_embd not a multiple of n_head)
        raise UserError(f"no {cls.__name__} config describes the compressed layers: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    if got != want:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise UserError(f"no {cls.__name__} config describes the compressed layers (e.g. {diff[0]}: "
                        f"{want.get(diff[0])} here, {got.get(diff[0])} from the config)")
    return _conv1d_layers(model)


def save_folder(model: nn.Module, out: Path, source: Path | None) -> list[str]:
    """Write `model` as a save_pretrained folder (model.safetensors) that its transformers class loads
    (`transformers_model`); copy the source folder's other files (tokenizer, preprocessor config) so
    HF tooling keeps working. Returns the file names."""
    transformers_model(model).save_pretrained(str(out), safe_serialization=True)
    if source is not None and (source / "config.json").is_file():
        cached = json.loads((source / "config.json").read_text()).get("use_cache")
        if cached is not None:  # load_folder turned the KV cache off for the whole-sequence forward
            config = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps({**config, "use_cache": cached}, indent=2, sort_keys=True) + "\n")
    if source is not None and source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in WEIGHT_FILES and not (out / f.name).exists() \
                    and not f.name.startswith("model-") and not f.name.startswith("pytorch_model-"):
                shutil.copy2(f, out / f.name)
    return sorted(p.name for p in out.iterdir())
