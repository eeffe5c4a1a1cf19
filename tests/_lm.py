"""Tiny causal language models trained here, for the language-model tests: a made-up text, a
BPE tokenizer trained on it (saved as the model folder's tokenizer.json, as Hugging Face does), and
a GPT-2 or a Llama with grouped-query attention trained on it for a few seconds, saved with
save_pretrained. Nothing is downloaded."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

WORDS = ("the cat sat on a mat", "a dog ran to the park", "my bird sang in the tree", "the sun rose over a hill")


def text(sentences: int = 1200, seed: int = 0) -> str:
    """Sentences with structure a small model learns in seconds (each sentence a fixed phrase, the
    phrase picked at random), so next-token accuracy is well above chance and pruning can hurt it."""
    rng = random.Random(seed)
    return " . ".join(rng.choice(WORDS) for _ in range(sentences)) + " ."


def tokenizer(corpus: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=48, special_tokens=["<unk>"], show_progress=False))
    return tok


def build(family: str, vocab: int, seq_len: int):
    import transformers as T

    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=32, n_layer=2, n_head=4,
                           bos_token_id=0, eos_token_id=0, use_cache=False)
        return T.GPT2LMHeadModel(cfg)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    return T.LlamaForCausalLM(cfg)


def make_lm(folder: Path, family: str = "llama", seq_len: int = 24, steps: int = 80) -> dict:
    """Writes FOLDER/{family} (config, model.safetensors, tokenizer.json), FOLDER/corpus.txt and
    FOLDER/tokens.npz (the corpus tokenized and cut into sequences, x alone). Returns the paths."""
    corpus = text()
    tok = tokenizer(corpus)
    ids = np.asarray(tok.encode(corpus).ids, dtype=np.int64)
    n = len(ids) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    torch.manual_seed(0)
    model = build(family, tok.get_vocab_size(), seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xt = torch.from_numpy(x)
    model.train()
    for step in range(steps):
        batch = xt[torch.randint(0, len(xt), (16,))]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = folder / family
    model.save_pretrained(str(out))
    tok.save(str(out / "tokenizer.json"))
    (folder / "corpus.txt").write_text(corpus)
    np.savez(folder / "tokens.npz", x=x)
    return {"model": out, "text": folder / "corpus.txt", "npz": folder / "tokens.npz", "seq_len": seq_len,
            "loss": float(loss.detach())}
