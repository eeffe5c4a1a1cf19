"""Where a run keeps its finished steps so that an interrupted run can continue: a folder keyed by
a hash of everything that determines the result (recipe, seed, model file, data), beside the
output folder, plus a lock so that two runs never write the same output folder at once."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ticketforge.errors import UserError


def file_digest(path: Path) -> str:
    """SHA-256 of a file. A folder (an HF save_pretrained model, an image folder) may hold gigabytes:
    its digest is over each file's name, size and modification time instead."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_digest(spec: str | None) -> str | None:
    """Digest of the source file that defines a `package.module:callable` spec (--arch, --data),
    once the run has imported it: a user who edits their model or data code gets a new run key, so
    stale stages are never resumed. None for anything that is not such a spec."""
    if not isinstance(spec, str) or ":" not in spec or Path(spec).exists():
        return None
    name, _, attr = spec.partition(":")
    module = sys.modules.get(name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    # The imported module and, where the callable comes from elsewhere (a re-export), its own module.
    files = {getattr(m, "__file__", None) for m in (module, sys.modules.get(getattr(obj, "__module__", None) or ""))}
    files = sorted(f for f in files if f and Path(f).is_file())
    return hashlib.sha256("".join(file_digest(Path(f)) for f in files).encode()).hexdigest() if files else None


def run_key(parts: dict[str, Any]) -> str:
    """Content hash of the things that determine a run's result: files by their digest, and code
    named by `package.module:callable` by the digest of its source file."""
    resolved = {}
    for k, v in sorted(parts.items()):
        if isinstance(v, Path) or (isinstance(v, str) and Path(v).exists()):
            resolved[k] = file_digest(Path(v))
        elif code_digest(v) is not None:
            resolved[k] = [v, code_digest(v)]
        else:
            resolved[k] = v
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Store:
    """Finished steps in one folder, saved with torch.save and read back with weights_only=True."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def save(self, name: str, obj: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.pt.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.path(name))  # a step is finished only once its file is complete

    def load(self, name: str) -> Any:
        return torch.load(self.path(name), map_location="cpu", weights_only=True)

    def subdir(self, name: str) -> Path:
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


class RunState(Store):
    """Finished steps of one run (a Store keyed by the run), locked while the run works."""

    def __init__(self, out: Path, key: str):
        root = out.parent / ".ticketforge"
        super().__init__(root / f"{out.name}-{key}")
        self.lock_path = root / f"{out.name}.lock"
        self._lock = None

    def __enter__(self) -> "RunState":
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.lock_path, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise UserError(f"another ticketforge run is writing this output folder (lock {self.lock_path}); "
                            "wait for it or choose another --out") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
        return False

    def finish(self) -> None:
        """The run succeeded: its steps are no longer needed."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # only if empty
        except OSError:
            pass
