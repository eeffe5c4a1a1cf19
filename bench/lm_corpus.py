"""A language-model corpus made here, offline: the Python standard library's own source files,
split into train and validation by file, and a byte-level BPE tokenizer trained on the train half.

    python bench/lm_corpus.py OUT_DIR        # writes OUT_DIR/tokenizer.json (+ config) and tokens.npz

The corpus is the top-level `*.py` files of `sysconfig.get_paths()["stdlib"]` (no packages, no
tests), in sorted order; a file goes to validation when the first byte of the SHA-1 of its name is
below 256 * val_fraction, so the split is fixed by the names alone and no file is in both halves.
A fixed subset of at most `max_bytes` is kept: the files in the order of the SHA-1 of their names
until the budget is spent. Each file is tokenized on its own and followed by the end-of-text token;
the stream is cut into windows of `seq_len` tokens (no padding, no overlap).

The corpus differs between Python versions; the version is part of every cache key built on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class CorpusConfig:
    vocab_size: int = 1024       # BPE vocabulary, the 256 bytes and the end-of-text token included
    seq_len: int = 128           # tokens per sequence of the .npz
    max_bytes: int = 3_000_000   # corpus size cap (train + validation), in bytes of source
    val_fraction: float = 0.1    # share of files that are validation

    def key(self) -> str:
        """Identity of the corpus and tokenizer: these settings and the Python that supplies the files."""
        ident = json.dumps({**asdict(self), "python": sys.version.split()[0]}, sort_keys=True)
        return hashlib.sha1(ident.encode()).hexdigest()[:10]


def _name_hash(path: Path) -> bytes:
    return hashlib.sha1(path.name.encode()).digest()


def split_files(cfg: CorpusConfig, root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, validation) source files, each in sorted order; disjoint by construction."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    kept, total = [], 0
    for f in sorted(files, key=_name_hash):
        size = f.stat().st_size
        if total + size > cfg.max_bytes:
            continue  # a later, smaller file may still fit
        kept.append(f)
        total += size
    kept = sorted(kept)
    cut = int(256 * cfg.val_fraction)
    val = [f for f in kept if _name_hash(f)[0] < cut]
    train = [f for f in kept if _name_hash(f)[0] >= cut]
    return train, val


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet), trained on `texts` only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    """tokenizer.json and a tokenizer_config.json with which transformers' AutoTokenizer loads the
    folder offline as a PreTrainedTokenizerFast (4.x and 5.x); end-of-text is bos, eos and unk, and
    there is no pad token (as GPT-2's own tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
              "unk_token": EOT, "add_bos_token": False, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Token ids of every text, each followed by end-of-text, one stream."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.int64)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """N x seq_len non-overlapping windows (the tail shorter than seq_len is dropped)."""
    n = len(stream) // seq_len
    return stream[:n * seq_len].reshape(n, seq_len)


def build(out: Path, cfg: CorpusConfig = CorpusConfig()) -> dict:
    """Tokenizer files and tokens.npz (`x`: train windows, `x_val`: validation windows) in `out`;
    returns what was built (files, bytes, tokens). Returns early if `out` holds it already."""
    out = Path(out)
    info_path = out / "corpus.json"
    if info_path.exists() and (out / "tokens.npz").exists() and (out / "tokenizer.json").exists():
        return json.loads(info_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    train_files, val_files = split_files(cfg)
    train_texts, val_texts = [read(f) for f in train_files], [read(f) for f in val_files]
    tok = train_tokenizer(train_texts, cfg.vocab_size)
    save_tokenizer(tok, out)
    train_ids, val_ids = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    np.savez(out / "tokens.npz", x=windows(train_ids, cfg.seq_len), x_val=windows(val_ids, cfg.seq_len))
    info = {"config": asdict(cfg), "python": sys.version.split()[0],
            "stdlib": sysconfig.get_paths()["stdlib"],
            "train_files": [f.name for f in train_files], "val_files": [f.name for f in val_files],
            "train_bytes": sum(len(t.encode()) for t in train_texts),
            "val_bytes": sum(len(t.encode()) for t in val_texts),
            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
            "vocab_size": tok.get_vocab_size()}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def subset(npz: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A smaller .npz of the same windows: n_train of `x` and n_val of `x_val`, evenly spaced (so
    that every part of the corpus is in it), for runs that need calibration data, not the corpus."""
    d = np.load(npz)

    def pick(a, n):
        return a if n <= 0 or n >= len(a) else a[np.linspace(0, len(a) - 1, n).round().astype(int)]

    np.savez(out, x=pick(d["x"], n_train), x_val=pick(d["x_val"], n_val))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", type=Path)
    d = CorpusConfig()
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--max-bytes", type=int, default=d.max_bytes)
    a = p.parse_args(argv)
    info = build(a.out, CorpusConfig(a.vocab_size, a.seq_len, a.max_bytes))
    print(json.dumps({k: v for k, v in info.items() if not k.endswith("_files")}, indent=1))


if __name__ == "__main__":
    main()
