"""bench/lm_corpus.py: the split by file leaks nothing, the locally trained byte-level tokenizer
round-trips any text and loads offline through transformers; bench/lm.py reads its CSV (no training)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import lm  # noqa: E402
import lm_corpus  # noqa: E402

pytest.importorskip("tokenizers")


def test_split_by_file_is_disjoint_fixed_and_capped(tmp_path):
    for i in range(60):
        (tmp_path / f"mod{i}.py").write_text(f"x{i} = {i}\n" * (i + 1))
    cfg = lm_corpus.CorpusConfig(max_bytes=4000, val_fraction=0.2)
    train, val = lm_corpus.split_files(cfg, tmp_path)
    assert train and val and not {f.name for f in train} & {f.name for f in val}
    assert sum(f.stat().st_size for f in train + val) <= 4000
    assert (train, val) == lm_corpus.split_files(cfg, tmp_path)  # the names alone decide
    bigger = lm_corpus.split_files(lm_corpus.CorpusConfig(max_bytes=10 ** 6, val_fraction=0.2), tmp_path)
    assert {f.name for f in val} <= {f.name for f in bigger[1]}  # a file's half does not depend on the cap


def test_tokenizer_round_trips_and_loads_offline(tmp_path, monkeypatch):
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "# comment\nimport os\n"] * 20
    tok = lm_corpus.train_tokenizer(texts, vocab_size=300)
    s = "def g(y):\n\treturn  'é 漢字'  # never seen\n\n"
    assert tok.decode(tok.encode(s).ids) == s  # byte-level: nothing is unknown
    stream = lm_corpus.encode_stream(tok, texts[:2])
    assert stream[-1] == tok.token_to_id(lm_corpus.EOT) and lm_corpus.windows(stream, 4).shape == (len(stream) // 4, 4)
    lm_corpus.save_tokenizer(tok, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    fast = AutoTokenizer.from_pretrained(tmp_path)
    assert fast.decode(fast(s)["input_ids"]) == s and fast.eos_token == lm_corpus.EOT


def test_subset_keeps_evenly_spaced_windows(tmp_path):
    np.savez(tmp_path / "t.npz", x=np.arange(100 * 4).reshape(100, 4), x_val=np.arange(10 * 4).reshape(10, 4))
    d = np.load(lm_corpus.subset(tmp_path / "t.npz", tmp_path / "s.npz", 5, 50))
    assert d["x"][:, 0].tolist() == [0, 100, 200, 296, 396] and len(d["x_val"]) == 10


def test_quality_reads_a_perplexity_section_and_the_table_marks_what_did_not_run():
    report = {"perplexity": {"dense": 9.0, "onnx": 12.5, "tokens": 1000},
              "accuracy": {"dense": 0.41, "dense_onnx": 0.4, "compressed": 0.35, "onnx": 0.34},
              "agreement": {"onnx": 0.6}}
    assert lm.quality(report) == {"dense_ppl": 9.0, "ppl": 12.5, "ppl_before_finetune": None, "dense_top1": 0.4,
                                  "top1": 0.34, "top1_before_finetune": None, "agreement": 0.6}
    assert lm.quality({"accuracy": None})["ppl"] is None

    def row(method, seed, status, ppl="", speed=""):
        return {"family": "gpt2", "setting": "channels-2x", "method": method, "seed": str(seed), "status": status,
                "ppl": str(ppl), "dense_ppl": "9.0" if ppl else "", "speedup": str(speed),
                "reason": "" if status == "ok" else "no"}

    rows = [row("cts", 0, "ok", 12.0, 2.1), row("cts", 1, "ok", 14.0, 1.9), row("wanda", 0, "n/a")]
    lines = lm.table(rows).splitlines()
    assert lines[0] == "**gpt2** (dense perplexity 9.00)"
    assert lines[4] == "| channels-2x | 13.00 ± 1.41 (2), 2.00x | n/a | - | - | - |"
    assert lm.reasons(rows) == "- gpt2 / channels-2x / `wanda` (n/a): no"
