"""The user's data: `digits` (bundled with scikit-learn), a .npz file, an image folder
(ticketforge.images), or a Python callable."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ticketforge import device as device_mod, distributed
from ticketforge.errors import UserError
from ticketforge.images import UNLABELED
from ticketforge.tasks import IGNORE


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    spec: str
    # The model's inputs, as the exported ONNX names them. Token ids with an attention mask travel
    # packed as one int64 sample (2, L), ids then mask (see ticketforge.adapt).
    inputs: list[str] = field(default_factory=lambda: ["input"])
    info: dict = field(default_factory=dict)  # for the report (an image folder's classes and cache)
    # False: the data came without labels; its `y` is the dense model's top-1 (label_with_dense), so that
    # evaluations read as agreement with it, and training distills instead of learning from `y`.
    labeled: bool = True
    # What the model's outputs are scored against (ticketforge.tasks), set by check_against_model.
    task: str = "classify"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch axis)."""
        return tuple(self.train[0][0].shape)

    @property
    def graph_input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the exported model's first input: packed token ids and mask are
        two inputs there, each (L,)."""
        return self.input_shape[1:] if len(self.inputs) == 2 else self.input_shape

    def example(self, n: int = 2) -> torch.Tensor:
        return torch.stack([self.val[i][0] for i in range(min(n, len(self.val)))])




def _token_ids(x: np.ndarray) -> bool:
    """An integer N x L array other than uint8 (which is pixels) holds token ids."""
    return x.ndim == 2 and np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8


def _to_tensors(x: np.ndarray, y: np.ndarray | None, where: str, mask: np.ndarray | None = None) -> TensorDataset:
    """(x, y) as tensors; without `y` (data without labels) the labels are UNLABELED until
    label_with_dense fills them in."""
    if x.ndim < 2:
        raise UserError(f"{where}: x must be N x F or N x C x H x W, got shape {x.shape}")
    if len(x) == 0:
        raise UserError(f"{where}: the split is empty")
    if y is None:
        y = np.full(len(x), UNLABELED, dtype=np.int64)
    elif len(x) != len(y):
        raise UserError(f"{where}: x has {len(x)} samples but y has {len(y)}")
    elif y.ndim == 2 and _token_ids(x):  # one label per token (token classification); -100: no label there
        if y.shape != x.shape or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{where}: per-token labels y must be integers shaped like x {x.shape}, got {y.dtype} {y.shape}")
        if ((y < 0) & (y != IGNORE)).any():
            raise UserError(f"{where}: y has negative labels other than {IGNORE} (a position without a label)")
    elif y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise UserError(f"{where}: y must be a 1-D array of integer class labels, got {y.dtype} {y.shape}")
    elif (y < 0).any():
        raise UserError(f"{where}: y has negative labels")
    if _token_ids(x):  # used as they are: int64, never scaled
        if (x < 0).any():
            raise UserError(f"{where}: x holds token ids (an integer N x L array) but some are negative")
        xt = torch.from_numpy(x.astype(np.int64))
        if mask is not None:
            if mask.shape != x.shape or not np.isin(mask, (0, 1)).all():
                raise UserError(f"{where}: attention_mask must be 0/1 of the same shape as x {x.shape}, "
                                f"got {mask.dtype} {mask.shape}")
            xt = torch.stack((xt, torch.from_numpy(mask.astype(np.int64))), 1)
    elif mask is not None:
        raise UserError(f"{where}: an attention_mask goes with token ids (x an integer N x L array), "
                        f"but x is {x.dtype} {x.shape}")
    elif np.issubdtype(x.dtype, np.uint8):
        xt = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif np.issubdtype(x.dtype, np.number):
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not torch.isfinite(xt).all():
            raise UserError(f"{where}: x contains NaN or Inf values")
    else:
        raise UserError(f"{where}: x has dtype {x.dtype}, expected numbers")
    return TensorDataset(xt, torch.from_numpy(y.astype(np.int64)))


def _split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(ds)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise UserError(f"--val-fraction {fraction} leaves no training samples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, perm[n_val:]), Subset(ds, perm[:n_val])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64)


def _npz(path: Path) -> tuple[TensorDataset, TensorDataset | None, list[str], bool]:
    """(train, val or None, input names, labeled): `x` with `y`, or `x` alone (no labels)."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
        names = set(arrays.files)
    except Exception as exc:
        raise UserError(f"data file {path} is not a readable .npz: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "x" not in names:
        raise UserError(f"data file {path} lacks array x (has: {', '.join(sorted(names)) or 'none'})")
    labeled = "y" in names
    if not labeled and "y_val" in names:
        raise UserError(f"data file {path} has y_val but no y: give labels for both splits, or for neither")
    masked = "attention_mask" in names
    if ("attention_mask_val" in names) != (masked and "x_val" in names):
        raise UserError(f"data file {path}: give attention_mask_val with x_val exactly when there is an attention_mask")
    try:
        train = _to_tensors(arrays["x"], arrays["y"] if labeled else None, f"{path} (x{', y' if labeled else ''})",
                            arrays["attention_mask"] if masked else None)
        val = None
        if "x_val" in names or "y_val" in names:
            if labeled and not {"x_val", "y_val"} <= names:
                raise UserError(f"data file {path}: has labels y, so give both x_val and y_val, or neither")
            if "x_val" not in names:
                raise UserError(f"data file {path}: has y_val but no x_val")
            val = _to_tensors(arrays["x_val"], arrays["y_val"] if labeled else None,
                              f"{path} (x_val{', y_val' if labeled else ''})",
                              arrays["attention_mask_val"] if masked else None)
    except ValueError as exc:  # object arrays refused by allow_pickle=False
        raise UserError(f"data file {path}: {exc}") from None
    if val is not None and (val.tensors[0].shape[1:] != train.tensors[0].shape[1:]
                            or val.tensors[0].dtype != train.tensors[0].dtype):
        raise UserError(f"data file {path}: x_val samples are {val.tensors[0].dtype} {tuple(val.tensors[0].shape[1:])}, "
                        f"x has {train.tensors[0].dtype} {tuple(train.tensors[0].shape[1:])}")
    return train, val, ["input", "attention_mask"] if masked else ["input"], labeled


TEXT_SUFFIXES = (".txt", ".text")


def _text(path: Path, tokenizer: Path | None, seq_len: int) -> TensorDataset:
    """A text file as token-id sequences for a language model: tokenized with the model folder's own
    tokenizer.json (the `tokenizers` library reads it; nothing is fetched), then cut into
    consecutive sequences of `seq_len` tokens (the tail that does not fill one is dropped)."""
    if not path.is_file():
        raise UserError(f"text data {path} does not exist")
    if tokenizer is None or not tokenizer.is_file():
        raise UserError(f"text data {path} needs a tokenizer: give a Hugging Face model folder holding tokenizer.json "
                        "as MODEL, or tokenize the text yourself into an .npz of token ids (x: N x L)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        from ticketforge.hf import INSTALL
        raise UserError(f"text data needs the tokenizers library: {INSTALL}") from None
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:
        raise UserError(f"{tokenizer} does not load as a tokenizers tokenizer: {str(exc).splitlines()[0]}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"text data {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    n = len(ids) // seq_len
    if n < 2:
        raise UserError(f"text data {path} gives {len(ids)} tokens: fewer than two sequences of data.seq_len "
                        f"{seq_len} (a training and a validation one)")
    return _to_tensors(ids[:n * seq_len].reshape(n, seq_len), None, str(path))


def _callable(spec: str):
    from ticketforge.models import import_callable

    fn = import_callable(spec, "--data")
    try:
        result = fn()
        train, val = result
    except Exception as exc:
        raise UserError(f"--data {spec!r}: must return (train_dataset, val_dataset): {type(exc).__name__}: {exc}") from None
    for name, ds in (("train", train), ("val", val)):
        if ds is not None and len(ds) == 0:
            raise UserError(f"--data {spec!r}: the {name} split is empty")
    return train, val


def load_data(spec: str, val_fraction: float = 0.1, seed: int = 0, cfg=None, tokenizer: Path | None = None) -> DataBundle:
    """`cfg`: the recipe's `data` section (how an image folder or a text file is read); defaults when
    None. `tokenizer`: the model folder's tokenizer.json, for text files."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    inputs, info, labeled = ["input"], {}, True
    if spec == "digits":
        x, y = _digits()
        train, val = TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), None
    elif spec.endswith(TEXT_SUFFIXES):
        from ticketforge.recipe import DataConfig

        train, val, labeled = _text(Path(spec), tokenizer, (cfg or DataConfig()).seq_len), None, False
    elif spec.endswith(".npz") or Path(spec).is_file():
        train, val, inputs, labeled = _npz(Path(spec))
    elif Path(spec).is_dir():
        from ticketforge import images
        from ticketforge.recipe import DataConfig

        train, val, info = images.load(Path(spec), cfg or DataConfig())
        labeled = bool(info["classes"])
    elif ":" in spec:
        train, val = _callable(spec)
    else:
        raise UserError(f"--data {spec!r}: expected 'digits', a .npz file, an image folder, or package.module:callable")
    if val is None:
        train, val = _split(train, val_fraction, seed)
    return DataBundle(train=train, val=val, spec=spec, inputs=inputs, info=info, labeled=labeled)


def _base(ds: Dataset) -> tuple[Dataset, torch.Tensor | None]:
    """The dataset under a Subset, and the Subset's indices (None when `ds` is no Subset)."""
    if isinstance(ds, Subset):
        return ds.dataset, torch.as_tensor(ds.indices)
    return ds, None


@torch.no_grad()
def label_with_dense(bundle: DataBundle, model: torch.nn.Module, device: torch.device) -> None:
    """Data without labels: each sample's label becomes the dense model's top-1, so that every
    evaluation of a ticket in torch reads as its agreement with the dense model. Training does not
    learn from these labels: it distills (finetune.distill_weight)."""
    model.eval()
    bases = {id(b): b for b in (_base(bundle.train)[0], _base(bundle.val)[0])}  # a held-out split shares its base
    for base in bases.values():
        top1 = torch.cat([model(device_mod.inputs_to(x, device, model)).argmax(-1).cpu() for x, _ in loader(base, 256)])
        if isinstance(base, TensorDataset):
            base.tensors = (base.tensors[0], top1)
        else:  # an image folder
            base.targets = top1


def labels_of(ds: Dataset) -> torch.Tensor:
    base, idx = _base(ds)
    labels = base.tensors[1] if isinstance(base, TensorDataset) else getattr(base, "targets", None)
    if isinstance(labels, torch.Tensor):  # without reading (or decoding) every sample
        return labels if idx is None else labels[idx]
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])


# Set once per run by the pipeline (ticketforge.data.use_device): loaders feeding a GPU pin memory
# and use workers, whoever builds them.
_LOADER_DEVICE = torch.device("cpu")


def use_device(device: torch.device) -> None:
    global _LOADER_DEVICE
    _LOADER_DEVICE = torch.device(device)


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
           sampler=None) -> DataLoader:
    """A DataLoader. Under torchrun a shuffled (training) loader gives each rank its own shard and
    batch_size // world_size samples per batch, so batch_size stays the global batch; evaluation
    loaders (shuffle=False) see the whole split on every rank."""
    if shuffle and sampler is None and distributed.active():
        sampler = distributed.sampler(ds, shuffle=True, seed=seed)
        batch_size = distributed.per_rank_batch(batch_size)
    gen = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    options = device_mod.loader_options(_LOADER_DEVICE, distributed.world_size())
    decoders = getattr(_base(ds)[0], "loader_workers", lambda: 0)()  # images beyond the decode cache
    if decoders and not options.get("num_workers"):
        options = {**options, "num_workers": decoders}
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, generator=gen,
                      drop_last=drop_last and len(ds) > batch_size, sampler=sampler, **options)


_SPATIAL = {torch.nn.Conv1d: ("L",), torch.nn.Conv2d: ("H", "W"), torch.nn.Conv3d: ("D", "H", "W")}


def expected_input(model: torch.nn.Module) -> str | None:
    """What the model's first weight layer takes, e.g. "its first layer 0.0 (Conv2d) expects
    (batch, 3, H, W)"; None when there is none. The first layer in registration order is usually,
    not always, the first one applied, hence the wording."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shape = ("batch", str(m.in_features))
        else:
            spatial = next((dims for cls, dims in _SPATIAL.items() if isinstance(m, cls)), None)
            if spatial is None:
                continue
            shape = ("batch", str(m.in_channels), *spatial)
        return f"its first layer {name or '(the model itself)'} ({type(m).__name__}) expects ({', '.join(shape)})"
    return None


def _vocabulary(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding (its first nn.Embedding), None without one."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, torch.nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def check_against_model(bundle: DataBundle, model: torch.nn.Module, architectures: list[str] | None = None) -> int:
    """Run one validation batch through the model: shape errors and label range become clear errors.
    Decides the task (ticketforge.tasks: per-sample classes, a causal LM's next token, a label per
    token), records it on the model, and returns the number of classes (a language model's vocabulary).
    A language model's data is its own target: the bundle counts as labeled."""
    from ticketforge import tasks

    x = bundle.example(2)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        vocab = _vocabulary(model)
        if vocab is not None and x.dtype == torch.int64 and int(x.max()) >= vocab:
            raise UserError(f"--data {bundle.spec}: token ids go up to {int(x.max())} but the model's vocabulary has "
                            f"{vocab} entries (was the data tokenized with this model's tokenizer?)") from None
        expects = expected_input(model)
        raise UserError(f"the model rejects inputs of shape {tuple(x.shape)} (batch, *sample) from --data "
                        f"{bundle.spec}{'; ' + expects if expects else ''}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    got = f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, 3):
        raise UserError(f"the model must return logits of shape (batch, classes), or (batch, seq, vocab) for a "
                        f"language model or token classifier; got {got}")
    y = labels_of(bundle.val)
    if out.ndim == 3 and x.dtype != torch.int64:
        raise UserError(f"the model returns per-position logits {got}, which ticketforge reads as a language model "
                        "or token classifier: its data must be token ids (an integer N x L array x)")
    task = tasks.infer(out.ndim, y.dim(), bundle.labeled, architectures)
    if task is None:
        shape = "(N, L) (one per token)" if out.ndim == 3 else "(N,) (one per sample)"
        raise UserError(f"the model returns logits {got} but the labels y are {tuple(y.shape)}: they must be {shape}; "
                        "a language model needs no labels (give x alone)")
    model.ticketforge_task = bundle.task = task
    classes = out.shape[-1]
    if task == tasks.NEXT_TOKEN:
        bundle.labeled = True  # the next token is the label
        checked = (("training", bundle.train), ("validation", bundle.val))
        for name, ds in checked:
            ids = _base(ds)[0]
            ids = ids.tensors[0] if isinstance(ids, TensorDataset) else None
            if ids is not None and len(ids) and int(ids.max()) >= classes:
                raise UserError(f"the {name} token ids go up to {int(ids.max())} but the model's vocabulary has "
                                f"{classes} entries (was the data tokenized with this model's tokenizer?)")
        return classes
    for name, ds in (("training", bundle.train), ("validation", bundle.val)):
        y = labels_of(ds)
        if len(y) and int(y.max()) >= classes:
            raise UserError(f"the {name} labels go up to {int(y.max())} but the model has {classes} outputs "
                            f"(labels must be 0..{classes - 1})")
    return classes
