"""Image folders as data (`--data DIR`), read with Pillow (no torchvision needed).

Layouts, as torchvision's ImageFolder: `DIR/train/<class>/*` with an optional `DIR/val/<class>/*`,
or `DIR/<class>/*` (the validation split is then held out by --val-fraction). Classes are the
sorted folder names of the training split. Images without class folders (`DIR/*`, or `DIR/train/*`
with an optional `DIR/val/*`) are data without labels: the dense model is then the teacher. Each image is converted to RGB, its shorter side
resized to `data.resize`, center-cropped to `data.crop` and normalised by `data.mean` and
`data.std` (recipe section `data`; ImageNet's at 224 by default).

Decoding must not dominate a run that reads every image once per epoch (and more during the
search): images are decoded once, at load time, by `data.workers` threads (Pillow releases the
GIL while decoding and resizing), and kept as uint8 crops in memory up to `data.cache_mb`; the
rest are decoded on the fly by `data.workers` loader processes. Decoding at load time also means
a corrupt image is refused before any work, with its path."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ticketforge.errors import UserError

# The label of a sample of data without labels (an image outside class folders; ticketforge.data uses it
# for every kind of data), until the dense model labels it (data.label_with_dense).
UNLABELED = -1

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class BadImage(UserError):
    """An image that does not decode. Raised in a loader process, the DataLoader re-raises it in
    the main process with the worker's traceback as its message: keep the one line that names the file."""

    def __init__(self, message: str):
        if "Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # matplotlib requires Pillow, so this only happens in unusual environments
        raise UserError("reading an image folder needs Pillow: pip install pillow") from None
    return Image


def _classes(split: Path) -> list[str]:
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _items(split: Path, classes: list[str], where: str) -> list[tuple[Path, int]]:
    items = []
    for label, name in enumerate(classes):
        files = _files(split / name)
        if not files:
            raise UserError(f"--data {where}: class folder {split / name} has no images "
                            f"({', '.join(sorted(EXTENSIONS))})")
        items += [(f, label) for f in files]
    return _readable(items, where)


def _unlabeled(split: Path, where: str) -> list[tuple[Path, int]]:
    """The images directly in `split` (no class folders), each labeled UNLABELED."""
    files = sorted(p for p in split.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    return _readable([(f, UNLABELED) for f in files], where)


def _readable(items: list[tuple[Path, int]], where: str) -> list[tuple[Path, int]]:
    Image = _pillow()
    for path, _ in items:  # the header only: cheap, and catches files that are not images at all
        try:
            with Image.open(path) as im:
                im.size
        except Exception as exc:
            raise UserError(f"--data {where}: {path} is not a readable image: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return items


def scan(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]] | None, list[str]]:
    """(training items, validation items or None, class names) of an image folder; no class names
    for images without class folders (no labels)."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = _classes(train_dir)
    val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    if not classes:
        train = _unlabeled(train_dir, str(root))
        if not train:
            raise UserError(f"--data {root}: no images and no class folders found (expected {root}/train/<class>/<image> "
                            f"with an optional {root}/val/<class>/<image>, or {root}/<class>/<image>; or, without "
                            f"labels, {root}/<image> or {root}/train/<image> with an optional {root}/val/<image>)")
        if train_dir == root or val_dir is None:
            return train, None, []
        if _classes(val_dir):
            raise UserError(f"--data {root}: {val_dir} has class folders but {train_dir} has none: give labels for "
                            "both splits, or for neither")
        return train, _unlabeled(val_dir, str(root)) or None, []
    train = _items(train_dir, classes, str(root))
    val = None
    if train_dir != root and val_dir is not None:
        val_classes = _classes(val_dir)
        unknown = [c for c in val_classes if c not in classes]
        if unknown:
            raise UserError(f"--data {root}: validation classes {unknown[:5]} have no training folder "
                            f"(training classes: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''})")
        val = _items(val_dir, val_classes, str(root))
        val = [(p, classes.index(val_classes[label])) for p, label in val]
    return train, val, classes


class ImageFolder(Dataset):
    """(normalised float image C x crop x crop, label) per item; decoded crops cached as uint8."""

    def __init__(self, items: list[tuple[Path, int]], cfg, cache_bytes: int):
        self.paths = [p for p, _ in items]
        self.targets = torch.tensor([y for _, y in items], dtype=torch.int64)
        self.resize, self.crop, self.workers = cfg.resize, cfg.crop, cfg.workers
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
        per_image = 3 * cfg.crop * cfg.crop
        self.cached = min(len(items), cache_bytes // per_image)
        self.cache = torch.empty((self.cached, 3, cfg.crop, cfg.crop), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def cache_bytes(self) -> int:
        return self.cache.numel()

    def decode(self, i: int) -> torch.Tensor:
        """uint8 3 x crop x crop: RGB, shorter side resized, center crop."""
        Image = _pillow()
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.resize / min(w, h)
                size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
                im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=None if scale > 0.5 else 3.0)
                left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
                im = im.crop((left, top, left + self.crop, top + self.crop))
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:
            raise BadImage(f"image {path} does not decode: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def fill(self) -> float:
        """Decode the cached part once, with `workers` threads; returns the seconds it took."""
        t = time.perf_counter()

        def one(i):
            self.cache[i] = self.decode(i)

        if self.workers > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(one, range(self.cached)))
        else:
            for i in range(self.cached):
                one(i)
        return time.perf_counter() - t

    def __getitem__(self, i: int):
        img = self.cache[i] if i < self.cached else self.decode(i)
        return (img.float() / 255.0 - self.mean) / self.std, self.targets[i]

    def loader_workers(self) -> int:
        """Loader processes worth starting: only when some images are decoded on the fly."""
        return self.workers if self.cached < len(self) else 0


def load(root: Path, cfg) -> tuple[ImageFolder, ImageFolder | None, dict]:
    """The training and (if the folder has one) validation split, decoded into the cache."""
    train_items, val_items, classes = scan(root)
    budget = cfg.cache_mb * 2 ** 20
    per_image = 3 * cfg.crop * cfg.crop
    val_take = min(len(val_items or []) * per_image, budget)  # validation first: it is read at every evaluation
    val = ImageFolder(val_items, cfg, val_take) if val_items else None
    train = ImageFolder(train_items, cfg, budget - val_take)
    seconds = train.fill() + (val.fill() if val is not None else 0.0)
    cached = train.cached + (val.cached if val is not None else 0)
    total = len(train) + (len(val) if val is not None else 0)
    info = {"classes": classes, "images": total, "cached": cached, "decode_seconds": round(seconds, 3),
            "cache_mb": round((train.cache_bytes + (val.cache_bytes if val is not None else 0)) / 2 ** 20, 1)}
    return train, val, info
