"""Load the user's model safely: checkpoints and state_dicts with weights_only, `.safetensors`
state_dicts, Hugging Face save_pretrained folders (ticketforge.hf), TorchScript, and whole pickled
modules only when the user says they trust the file."""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ticketforge import models, ticket
from ticketforge.errors import UserError

STATE_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass
class LoadedModel:
    model: nn.Module
    arch: str | None = None          # how to rebuild it (needed for rewind/init starts)
    arch_kwargs: dict = field(default_factory=dict)
    data: str | None = None          # a DATA spec the checkpoint carries
    kind: str = "state_dict"         # state_dict | safetensors | checkpoint | hf | torchscript | pickle
    # Structure conversions a ticket.pt asked for (ticketforge.ticket): replayed on a fresh model,
    # and carried into the next ticket so that compressions chain.
    conversions: list = field(default_factory=list)
    hf_config: dict | None = None    # an HF transformers model: its config, to rebuild it
    io: dict = field(default_factory=dict)  # how its inputs and outputs were adapted (ticketforge.adapt)
    source: Path | None = None       # an HF folder's path: its tokenizer files go into the output's hf/

    def fresh(self) -> nn.Module:
        """A freshly initialised copy of the architecture (with the same conversions, adapted like
        the loaded model)."""
        from ticketforge import adapt

        if self.arch is None and self.hf_config is None:
            raise UserError("this search start needs to re-initialise the model: give --arch "
                            "(or a checkpoint that names its arch)")
        if self.arch is None:
            from ticketforge import hf

            model = hf.build(self.hf_config)
        else:
            model = models.build(self.arch, self.arch_kwargs)
        return adapt.apply(ticket.rebuild(model, self.conversions), self.io)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names)


def _fit(model: nn.Module, state: dict, arch: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:5])}")
        raise UserError(f"the state_dict does not fit --arch {arch}: {'; '.join(parts)}")
    model.load_state_dict(state)


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's long weights_only message that says what was wrong."""
    text = str(exc)
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_model(path: str | Path, arch: str | None = None, arch_kwargs: dict | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if path.is_dir():
        from ticketforge import hf

        if not hf.is_folder(path):
            raise UserError(f"model path {path} is a folder but not a Hugging Face save_pretrained folder "
                            "(no config.json)")
        model, config = hf.load_folder(path, trust_pickle)
        return LoadedModel(model=model, arch=None, kind="hf", hf_config=config, source=path)
    if not path.is_file():
        raise UserError(f"model path {path} is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"model file {path} is empty")

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # torch.save's zip, cut short
        raise UserError(f"{path} is a truncated or corrupt PyTorch file: its zip archive has no end "
                        "(an interrupted download or copy?)")

    if path.suffix == ".safetensors":
        return _from_state(path, _safetensors(path), arch, arch_kwargs or {}, [], None, "safetensors")

    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise UserError(f"{path} looks like a TorchScript archive but does not load: {str(exc).splitlines()[0]}") from None
        return LoadedModel(model=model, arch=arch, arch_kwargs=arch_kwargs or {}, kind="torchscript")

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        kind = "state_dict"
    except pickle.UnpicklingError as exc:
        # Only a pickle that names a Python global (a class or function to call) carries code;
        # any other refusal of the weights-only unpickler means bytes that are not a pickle.
        if not any(m in str(exc) for m in ("Unsupported global", "Unsupported class")):
            raise UserError(f"{path} is not a readable PyTorch file (corrupt or truncated?): "
                            f"{_unpickler_reason(exc)}") from None
        if not trust_pickle:
            raise UserError(
                f"{path} is a pickle that carries Python objects, not just tensors; loading it would run code "
                "from the file. Pass --trust-pickle only if you trust who made it, or save a state_dict "
                "(torch.save(model.state_dict(), ...)) and pass --arch.") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise UserError(f"{path} does not load even trusted: {type(exc2).__name__}: {exc2}") from None
        kind = "pickle"
    except Exception as exc:  # zip/EOF/runtime errors: truncated or not a torch file at all
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable PyTorch file (corrupt or truncated?): {msg}") from None

    if isinstance(obj, nn.Module):
        return LoadedModel(model=obj, arch=arch, arch_kwargs=arch_kwargs or {}, kind=kind)

    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a model, checkpoint or state_dict")

    data_spec, conversions, hf_config = None, [], None
    state = obj
    if any(k in obj for k in STATE_KEYS) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next(k for k in STATE_KEYS if k in obj)
        state = obj[key]
        if isinstance(state, nn.Module):
            return LoadedModel(model=state, arch=arch, arch_kwargs=arch_kwargs or {}, kind=kind,
                               data=obj.get("data"))
        arch = arch or obj.get("arch")
        if arch_kwargs is None:
            arch_kwargs = obj.get("arch_kwargs") or {}
        data_spec = obj.get("data")
        conversions = ticket.conversions_of(obj)  # a ticket of a changed architecture: how to rebuild it
        hf_config = obj.get("hf_config")  # a ticket of an HF transformers model
        kind = "checkpoint"
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is a dict but not a state_dict (no tensors found under "
                        f"{', '.join(STATE_KEYS)} or at the top level)")
    return _from_state(path, state, arch, arch_kwargs or {}, conversions, hf_config, kind, data_spec)


def _safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"{path} is a .safetensors file, which needs the safetensors package: pip install safetensors") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable .safetensors file (corrupt or truncated?): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not state:
        raise UserError(f"{path} holds no tensors")
    return state


def _from_state(path: Path, state: dict, arch: str | None, arch_kwargs: dict, conversions: list,
                hf_config: dict | None, kind: str, data_spec: str | None = None) -> LoadedModel:
    """Build the architecture (--arch, or the HF config a ticket carries), replay a ticket's
    conversions, and load `state` into it."""
    if arch is None and hf_config is None:
        raise UserError(f"{path} is a state_dict: say which architecture it belongs to with --arch "
                        f"(a built-in: {', '.join(sorted(models.MODELS))}, or package.module:callable)")
    if arch is None:
        from ticketforge import hf

        model = hf.build(hf_config)
    else:
        model = models.build(arch, arch_kwargs)
    ticket.rebuild(model, conversions)
    _fit(model, state, arch or type(model).__name__)
    return LoadedModel(model=model, arch=arch, arch_kwargs=arch_kwargs, data=data_spec, kind=kind,
                       conversions=conversions, hf_config=None if arch else hf_config)
