"""Models and data as they come from the ecosystem (issue 12): what a model returns, HF
save_pretrained folders and .safetensors state_dicts as MODEL, token ids with an attention mask,
and image folders as DATA. Every run is a real `ticketforge compress` (click's runner), with no
fine-tuning and three timing repeats, on tiny models."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ticketforge import cli, images
from ticketforge.errors import UserError
from ticketforge.models import digits_resnet
from ticketforge.recipe import DataConfig

FAST = ["--sparsity", "0.5", "--epochs", "0", "--quiet", "--set", "validate.repeats=3", "--set", "validate.warmup=0",
        "--set", "validate.latency_batches=[1, 4]"]


def compress(*args, recipe="magnitude", out="out"):
    result = CliRunner().invoke(cli.cli, ["compress", *args, "--recipe", recipe, "--out", out, *FAST],
                                prog_name="ticketforge")
    assert result.exit_code == 0, result.output
    return json.loads(Path(out, "report.json").read_text())


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- what a model returns

OUTPUT_MODELS = textwrap.dedent("""
    import collections, torch
    Out = collections.namedtuple("Out", ["features", "logits"])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)
        def logits(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    class Dict(Net):
        def forward(self, x):
            return {"loss": None, "logits": self.logits(x)}

    class Tuple(Net):
        def forward(self, x):
            return self.logits(x), x.mean()

    class Named(Net):
        def forward(self, x):
            return Out(x.mean(), self.logits(x))
""")


@pytest.mark.parametrize("arch, how", [("Dict", "dict.logits"), ("Tuple", "tuple[0]"), ("Named", "Out.logits")])
def test_model_outputs_are_unwrapped_everywhere(arch, how):
    Path("tf_outputs.py").write_text(OUTPUT_MODELS)
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Linear(16, 10)
    torch.save({**{f"conv.{k}": v for k, v in conv.state_dict().items()},
                **{f"fc.{k}": v for k, v in fc.state_dict().items()}}, "net.pt")
    rng = np.random.default_rng(0)
    np.savez("data.npz", x=rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8), y=np.arange(40) % 10)
    r = compress("net.pt", "--arch", f"tf_outputs:{arch}", "--data", "data.npz", "--epochs", "1")
    assert r["model"]["output"] == how
    m = onnx.load("out/model.onnx")
    assert [o.name for o in m.graph.output] == ["logits"]
    x = np.load("data.npz")["x"][:5].astype(np.float32) / 255
    got = session("out/model.onnx").run(None, {"input": x})[0]
    assert got.shape == (5, 10) and r["parity"] < 1e-4


# ---------------------------------------------------------------- .safetensors and HF folders

def test_safetensors_state_dict_with_arch():
    from safetensors.torch import save_file
    save_file(digits_resnet(width=4).state_dict(), "model.safetensors")
    r = compress("model.safetensors", "--arch", "digits-resnet", "--arch-kwargs", '{"width": 4}', "--data", "digits")
    assert r["model"]["kind"] == "safetensors" and r["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)


def _bert(folder="bert-hf"):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=4, max_position_embeddings=32))
    model.save_pretrained(folder)
    Path(folder, "vocab.txt").write_text("\n".join(f"t{i}" for i in range(60)))  # stands in for the tokenizer
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, (64, 16))
    mask = np.ones_like(ids)
    mask[::2, 10:] = 0  # half the sequences are padded: the mask must reach the model
    np.savez("tok.npz", x=ids, y=np.arange(64) % 4, attention_mask=mask)
    return T, model


def test_hf_folder_with_token_ids_and_attention_mask():
    T, model = _bert()
    r = compress("bert-hf", "--data", "tok.npz")
    assert {k: r["model"][k] for k in ("kind", "arch", "output", "hf_class")} == {
        "kind": "hf", "arch": None, "output": "SequenceClassifierOutput.logits", "hf_class": "BertForSequenceClassification"}
    assert r["data"]["inputs"] == ["input", "attention_mask"] and r["macs"]["dense"] > 0
    # ONNX: two int64 inputs named as the data names them, one output; the mask changes the logits.
    sess = session("out/model.onnx")
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("input", "tensor(int64)"), ("attention_mask", "tensor(int64)")]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    d = np.load("tok.npz")
    ids, mask = d["x"][:4].astype(np.int64), d["attention_mask"][:4].astype(np.int64)
    masked = sess.run(None, {"input": ids, "attention_mask": mask})[0]
    unmasked = sess.run(None, {"input": ids, "attention_mask": np.ones_like(mask)})[0]
    assert np.abs(masked[0] - unmasked[0]).max() > 1e-6 and np.abs(masked[1] - unmasked[1]).max() < 1e-7
    # The compressed model written back as an HF folder, tokenizer files kept, read by transformers.
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in Path("out/hf").iterdir()}
    back = T.AutoModelForSequenceClassification.from_pretrained("out/hf", local_files_only=True).eval()
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(ref - masked).max() < 1e-4
    w = back.bert.encoder.layer[0].intermediate.dense.weight
    assert 0.3 < float((w == 0).float().mean()) < 0.7


def test_hf_ticket_rebuilds_from_its_config():
    """A ticket of an HF model carries its config: it is the next run's MODEL without --arch."""
    _bert()
    first = compress("bert-hf", "--data", "tok.npz")
    second = compress("out/ticket.pt", "--data", "tok.npz", out="out2")
    assert second["model"]["kind"] == "checkpoint"
    assert abs(second["accuracy"]["dense"] - first["accuracy"]["compressed"]) < 1e-6


def test_hf_folder_with_pickled_weights_loads_when_trusted():
    _, model = _bert()
    Path("bert-hf/model.safetensors").unlink()
    torch.save(model.state_dict(), "bert-hf/pytorch_model.bin")
    r = compress("bert-hf", "--data", "tok.npz", "--trust-pickle")
    assert r["model"]["kind"] == "hf"


# ---------------------------------------------------------------- image folders

def _images(root, classes=("cat", "dog", "owl"), n=6, size=(40, 30)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        Path(root, c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(Path(root, c, f"{i}.png"))


def test_image_folder_transform_matches_pillow_by_hand():
    from PIL import Image
    _images("imgs")
    cfg = DataConfig(resize=20, crop=16)
    train, val, info = images.load(Path("imgs"), cfg)
    assert val is None and info["classes"] == ["cat", "dog", "owl"] and info["cached"] == len(train) == 18
    x, y = train[7]
    assert int(y) == 1 and x.shape == (3, 16, 16)
    im = Image.open("imgs/dog/1.png").convert("RGB").resize((20, 27), Image.Resampling.BILINEAR)  # 30x40 -> 20x27
    ref = np.asarray(im.crop((2, 5, 18, 21)), np.float32) / 255
    ref = (ref - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() < 1e-5


def test_image_folder_cache_limit_and_loader_workers():
    from ticketforge.data import loader
    _images("imgs")
    per_image = 3 * 16 * 16
    train, _, info = images.load(Path("imgs"), DataConfig(resize=16, crop=16, cache_mb=0))
    assert info["cached"] == 0 and train.loader_workers() == 2
    assert loader(train, 8).num_workers == 2  # what does not fit the cache is decoded by loader processes
    full, _, _ = images.load(Path("imgs"), DataConfig(resize=16, crop=16))
    assert full.loader_workers() == 0 and loader(full, 8).num_workers == 0
    a = torch.cat([x for x, _ in loader(train, 8)])
    b = torch.cat([x for x, _ in loader(full, 8)])
    assert torch.equal(a, b) and full.cache_bytes == 18 * per_image


def test_image_that_breaks_in_a_loader_process_is_one_line():
    from ticketforge.data import loader
    _images("imgs")
    train, _, _ = images.load(Path("imgs"), DataConfig(resize=16, crop=16, cache_mb=0))
    Path("imgs/cat/0.png").write_bytes(Path("imgs/cat/0.png").read_bytes()[:200])
    with pytest.raises(UserError) as err:
        list(loader(train, 4))
    assert str(err.value).startswith("image imgs/cat/0.png does not decode") and "\n" not in str(err.value)


def test_image_folder_with_train_and_val_compresses():
    _images("imgs/train")
    _images("imgs/val", classes=("owl", "cat"), n=2)
    torch.save(digits_resnet(width=4, in_channels=3, num_classes=3).state_dict(), "m.pt")
    r = compress("m.pt", "--arch", "digits-resnet", "--arch-kwargs", '{"width": 4, "in_channels": 3, "num_classes": 3}',
                 "--data", "imgs", "--set", "data.resize=20", "--set", "data.crop=16")
    assert r["data"]["train"] == 18 and r["data"]["val"] == 4 and r["data"]["input_shape"] == [3, 16, 16]
    assert r["data"]["image_folder"]["cached"] == 22
