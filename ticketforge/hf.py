"""Hugging Face transformers models: a `save_pretrained` folder as MODEL, a model rebuilt from its
config (a ticket of an HF model, a fresh init for rewind starts), and the compressed model written
back as a folder where its shapes did not change.

transformers is an optional extra (`pip install 'ticketforge[hf]'`). Nothing here downloads: a
folder is loaded with `local_files_only`, and a model is built from a config, never from a hub name.
Weights are read from `model.safetensors` (safe by construction); a `pytorch_model.bin` is a pickle
and is only read with --trust-pickle."""
from __future__ import annotations

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
    return model.eval(), config_dict(model)


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
    return _class(T, cfg, "the stored transformers config")._from_config(cfg, dtype=torch.float32).eval()


def save_folder(model: nn.Module, out: Path, source: Path | None) -> list[str]:
    """Write `model` as a save_pretrained folder (model.safetensors); copy the source folder's other
    files (tokenizer, preprocessor config) so HF tooling keeps working. Returns the file names."""
    model.save_pretrained(str(out), safe_serialization=True)
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
