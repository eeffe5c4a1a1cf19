"""Language models: per-token objectives, perplexity, text data tokenized offline, and the CLI on
Hugging Face causal LM folders (a Llama with grouped-query attention, trained here on a made-up
text; tests/_lm.py)."""
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from _lm import make_lm  # noqa: E402
from ticketforge import tasks  # noqa: E402


def test_next_token_rows_shift_and_skip_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x = torch.stack((ids, mask), 1)
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    out, targets, _ = tasks.rows(tasks.NEXT_TOKEN, logits, x, torch.full((2,), -1))
    # row 0: positions 0..2 predict 6, 7, 8; row 1: only position 0 predicts 2 (3 and 4 are padding)
    assert targets.tolist() == [6, 7, 8, 2]
    assert torch.equal(out, torch.stack([logits[0, 0], logits[0, 1], logits[0, 2], logits[1, 0]]))


def test_per_token_kl_ignores_padding():
    """What a padded position holds (student or teacher) changes nothing: the loss is over real tokens."""
    from ticketforge.finetune import distill_loss

    torch.manual_seed(0)
    ids = torch.randint(0, 7, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    x = torch.stack((ids, mask), 1)
    s, t = torch.randn(3, 6, 7), torch.randn(3, 6, 7)

    def loss(s, t):
        out, y, soft = tasks.rows(tasks.NEXT_TOKEN, s, x, torch.zeros(3), t)
        return distill_loss(out, soft, y, 0.5, 2.0)

    base = loss(s, t)
    s2, t2 = s.clone(), t.clone()
    s2[1, 4:] += 100 * torch.randn(2, 7)
    t2[1, 4:] -= 50
    assert torch.allclose(loss(s2, t2), base)
    s2[1, 2, 0] += 5  # a real position does count
    assert not torch.allclose(loss(s2, t2), base)


def test_token_classification_rows_skip_unlabeled_positions():
    y = torch.tensor([[1, -100, 2], [0, 1, -100]])
    logits = torch.randn(2, 3, 4)
    out, targets, _ = tasks.rows(tasks.TOKENS, logits, torch.zeros(2, 3, dtype=torch.long), y)
    assert targets.tolist() == [1, 2, 0, 1] and out.shape == (4, 4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_lm(tmp_path_factory.mktemp("lm"), "llama")


def test_onnx_perplexity_is_what_transformers_computes(llama, tmp_path):
    """Perplexity from the exported file in ONNX Runtime = exp of HF's own next-token loss."""
    import transformers

    from ticketforge import adapt, export, recipe, validate
    from ticketforge.data import load_data

    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama["model"])).eval()
    bundle = load_data(str(llama["npz"]), 0.2, 0)
    x = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    with torch.no_grad():
        hf_loss = float(model(x, labels=x).loss)
    io = adapt.fit(model, bundle.inputs, x[:2])
    adapt.apply(model, {**io, "task": tasks.NEXT_TOKEN})
    path = export.export_onnx(model, x[:2], tmp_path / "m.onnx", recipe.resolve("magnitude").export)
    out = validate.onnx_outputs(path, bundle.val, tasks.NEXT_TOKEN)
    assert len(out.target) == len(x) * (x.shape[1] - 1)
    assert out.perplexity == pytest.approx(math.exp(hf_loss), rel=1e-4)
    assert out.perplexity < 8  # it learned the text (vocabulary 48)
    # the sequence axis is dynamic: a shorter sequence runs and matches torch
    with torch.no_grad():
        ref = model(x[:3, :10]).numpy()
    assert np.abs(validate.run(validate.session(path), x[:3, :10]) - ref).max() < 1e-4


def _compress(folder, *args):
    from _tiny import cli_subprocess

    return cli_subprocess(folder, "compress", *args, "--set", "validate.repeats=3", "--set", "validate.warmup=0",
                          "--set", "validate.latency_batches=[1]", "--set", "finetune.epochs=1")


def test_cli_compresses_a_llama_folder_on_text_tokenized_with_its_own_tokenizer(llama):
    """A text file as data: tokenized offline with the folder's tokenizer.json, cut to data.seq_len."""
    folder = llama["model"].parent
    r = _compress(folder, "llama", "--data", "corpus.txt", "--recipe", "magnitude", "--set", "search.sparsity=0.5",
                  "--set", "data.seq_len=16", "--out", "out-text", "--set", "gate.max_perplexity_ratio=100")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((folder / "out-text" / "report.json").read_text())
    assert report["data"]["input_shape"] == [16]
    ppl = report["perplexity"]
    assert 1 < ppl["dense"] < 8 and ppl["onnx"] >= 1 and ppl["tokens"] == report["data"]["val"] * 15
    assert 0 < report["agreement"]["onnx"] <= 1 and report["accuracy"]["dense_onnx"] > 0.3
    assert report["sparsity"]["achieved"] > 0.3
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    assert checks["max_perplexity_ratio[model.onnx]"]["measured"] == pytest.approx(ppl["onnx"] / ppl["dense"], rel=1e-4)
    assert "perplexity" in (folder / "out-text" / "report.md").read_text()


def test_language_model_inputs_that_do_not_fit_are_one_clear_line(llama, tmp_path):
    folder = llama["model"].parent
    x = np.load(llama["npz"])["x"]
    np.savez(folder / "per-sample-labels.npz", x=x, y=np.zeros(len(x), np.int64))
    np.savez(folder / "too-big.npz", x=x + 1000)
    cases = {"per-sample-labels.npz": "labels y are", "too-big.npz": "vocabulary has",
             "missing.txt": "does not exist"}
    for data, words in cases.items():
        r = _compress(folder, "llama", "--data", data, "--recipe", "magnitude", "--out", f"bad-{data}")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (data, r.stderr[-1500:])
        assert not (folder / f"bad-{data}").exists()
    # a text file with a model that has no tokenizer.json: what to do instead
    (tmp_path / "t.txt").write_text("the cat sat")
    from _tiny import cli_subprocess, make_tiny

    make_tiny(tmp_path)
    r = cli_subprocess(tmp_path, "compress", "mlp.pt", "--arch", "tinynet:Net", "--data", "t.txt", "--recipe", "magnitude",
                       "--out", "o")
    assert r.returncode == 2 and "tokenizer.json" in r.stderr and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_lm(tmp_path_factory.mktemp("gpt2"), "gpt2")


STRUCTURES = {"unstructured": ["--recipe", "magnitude", "--set", "search.sparsity=0.5"],
              "2:4": ["--recipe", "magnitude-2to4"],
              "channels": ["--recipe", "magnitude-channels", "--set", "search.target_macs=0.6", "--set", "convert.round_to=1"],
              "blocks": ["--recipe", "cts-blocks", "--set", "search.blocks=1", "--set", "search.epochs=1"]}


@pytest.mark.parametrize("family, structure", [("gpt2", "2:4"), ("gpt2", "channels"), ("llama", "blocks"),
                                               ("llama", "channels")])
def test_every_structure_on_a_causal_lm_folder_from_the_cli(family, structure, request):
    """Exit 0, parity checked, the structure really changed the exported file, perplexity and agreement
    in the report. (Llama unstructured: the text-file test above; the zoo runs every pair without the CLI.)"""
    lm = request.getfixturevalue(family)
    folder = lm["model"].parent
    out = f"out-{structure.replace(':', '')}"
    r = _compress(folder, family, "--data", "tokens.npz", *STRUCTURES[structure], "--set", "finetune.epochs=1",
                  "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((folder / out / "report.json").read_text())
    assert report["parity"] < 1e-3 and report["perplexity"]["onnx"] > 1 and 0 < report["agreement"]["onnx"] <= 1
    if structure in ("channels", "blocks"):
        assert report["macs"]["compressed"] < report["macs"]["dense"]
        assert report["params"]["compressed_weights"] < report["params"]["dense_weights"]
    else:
        back = report["structure"]["2:4"]["onnx"]
        assert back["valid"] == back["groups"] > 0 and back["bad"] == 0
