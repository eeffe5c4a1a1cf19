"""Small causal LMs trained here on the standard-library corpus of bench/lm_corpus.py, saved as HF
folders (save_pretrained, safetensors, with the corpus's tokenizer files) that `ticketforge compress`
reads as a user's model.

    python bench/lm_dense.py                       # gpt2 and llama, cached under bench/results/lm-cache/
    python bench/lm_dense.py --families gpt2 --steps 100

Families:
- gpt2   GPT2LMHeadModel: 4 layers, 4 heads, width 128, MLP 512, learned positions (seq_len), tied head
- llama  LlamaForCausalLM: 4 layers, 4 query heads sharing 2 key/value heads (grouped-query
         attention), RoPE, SwiGLU MLP 384, RMSNorm, tied head

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay,
gradient clip 1, batches of random windows of the train split, seeded; no dropout. Validation
perplexity = exp(mean next-token cross-entropy over every predicted token of the validation windows).
A folder is keyed by the corpus, the family's config and the training settings, so a re-run finds it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_corpus import CorpusConfig, build as build_corpus  # noqa: E402

CACHE = Path(__file__).parent / "results" / "lm-cache"
FAMILIES = ["gpt2", "llama"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600          # optimizer steps
    batch_size: int = 16      # windows per step (16 x 600: perplexity 45; 32 x 300, the same tokens: 57)
    lr: float = 3e-3          # peak learning rate
    warmup: float = 0.05      # fraction of the steps spent warming up
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1          # torch threads (1: on a shared 2-core machine more threads thrash)


@dataclass(frozen=True)
class DenseSpec:
    family: str = "gpt2"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def key(self) -> str:
        train = {k: v for k, v in asdict(self.train).items() if k != "threads"}  # threads: not the result
        ident = json.dumps({"family": self.family, "model": model_config(self.family, self.corpus),
                            "corpus": self.corpus.key(), "train": train}, sort_keys=True)
        return f"{self.family}-{hashlib.sha1(ident.encode()).hexdigest()[:10]}"


def model_config(family: str, corpus: CorpusConfig) -> dict:
    """The transformers config of `family` for this corpus's vocabulary and sequence length."""
    # No pad token, as GPT-2's own: the windows are never padded, and end-of-text inside one is text.
    common = {"vocab_size": corpus.vocab_size, "use_cache": False, "bos_token_id": 0, "eos_token_id": 0,
              "pad_token_id": None, "tie_word_embeddings": True}
    if family == "gpt2":
        return {**common, "model_type": "gpt2", "n_positions": corpus.seq_len, "n_embd": 128, "n_layer": 4,
                "n_head": 4, "n_inner": 512, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if family == "llama":
        return {**common, "model_type": "llama", "max_position_embeddings": corpus.seq_len, "hidden_size": 128,
                "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rope_theta": 10000.0}
    raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")


def build_model(family: str, corpus: CorpusConfig, seed: int):
    import transformers as T

    cfg = dict(model_config(family, corpus))
    kind = cfg.pop("model_type")
    torch.manual_seed(seed)
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(**cfg))
    return T.LlamaForCausalLM(T.LlamaConfig(**cfg))


@torch.no_grad()
def perplexity(model, x: np.ndarray, batch_size: int = 64) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of the windows `x`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        ids = torch.from_numpy(x[i:i + batch_size])
        logits = model(input_ids=ids).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def train(model, x: np.ndarray, cfg: TrainConfig, log=print) -> dict:
    """Plain next-token training of `model` on the windows `x`; returns the loss curve's summary."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    warm = max(1, int(cfg.warmup * cfg.steps))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(x)
    model.train()
    t, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        ids = data[torch.randint(len(data), (cfg.batch_size,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, cfg.steps // 10) == 0:
            rate = (step + 1) * cfg.batch_size * x.shape[1] / (time.perf_counter() - t)
            log(f"  step {step + 1}/{cfg.steps}: loss {np.mean(losses[-20:]):.3f} ({rate:.0f} tokens/s)")
    model.eval()
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 1), "tokens": cfg.steps * cfg.batch_size * x.shape[1],
            "tokens_per_s": round(cfg.steps * cfg.batch_size * x.shape[1] / seconds),
            "final_train_loss": round(float(np.mean(losses[-20:])), 4)}


def corpus_dir(corpus: CorpusConfig, cache: Path = CACHE) -> Path:
    path = Path(cache) / f"corpus-{corpus.key()}"
    build_corpus(path, corpus)
    return path


def prepare(spec: DenseSpec, cache: Path = CACHE, log=print) -> Path:
    """The trained model's folder (model, tokenizer, dense.json); trains it unless cached."""
    folder = Path(cache) / spec.key()
    if (folder / "dense.json").exists():
        return folder
    cdir = corpus_dir(spec.corpus, cache)
    d = np.load(cdir / "tokens.npz")
    torch.set_num_threads(spec.train.threads)
    model = build_model(spec.family, spec.corpus, spec.train.seed)
    params = sum(p.numel() for p in model.parameters())
    log(f"{spec.family}: {params / 1e6:.2f}M params, {len(d['x'])} train windows of {spec.corpus.seq_len}, "
        f"training {spec.train.steps} steps")
    ppl_init = perplexity(model, d["x_val"])
    stats = train(model, d["x"], spec.train, log)
    ppl = perplexity(model, d["x_val"])
    tmp = folder.with_name(folder.name + ".tmp")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp)  # safetensors
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / name).write_bytes((cdir / name).read_bytes())
    info = {"family": spec.family, "params": params, "val_perplexity": round(ppl, 4),
            "val_perplexity_init": round(ppl_init, 2), "val_windows": int(len(d["x_val"])),
            "corpus": cdir.name, "train": {**asdict(spec.train), **stats},
            "corpus_config": asdict(spec.corpus), "torch": torch.__version__}
    (tmp / "dense.json").write_text(json.dumps(info, indent=1) + "\n")
    tmp.rename(folder)
    log(f"{spec.family}: validation perplexity {ppl:.2f} (untrained {ppl_init:.0f}; vocab "
        f"{spec.corpus.vocab_size}) in {stats['seconds']:.0f}s -> {folder}")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    t = TrainConfig()
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--threads", type=int, default=t.threads)
    p.add_argument("--cache", type=Path, default=CACHE)
    a = p.parse_args(argv)
    tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads)
    for family in a.families:
        folder = prepare(DenseSpec(family, CorpusConfig(), tc), a.cache)
        print(json.dumps({"folder": str(folder), **json.loads((folder / "dense.json").read_text())}))


if __name__ == "__main__":
    main()
