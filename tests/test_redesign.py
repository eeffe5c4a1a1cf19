"""Structures as descriptors, named steps, and the defects that hid in the old seams (issue 11):
each test here failed before the redesign."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST
from ticketforge import recipe as recipes, structures
from ticketforge.errors import UserError

ARCH = ["--arch", "usermodels:UserNet"]


def compress(cli, user, recipe, out, *extra, model=None):
    args = ["compress", model or (user / "user.pt"), "--recipe", recipe, "--out", out, "--data",
            user / "train.npz", *ARCH, *FAST, *extra]
    return cli(*args)


# ---------------------------------------------------------------- defect 1: every ticket reloads; compressions chain

@pytest.mark.parametrize("first,second", [("layers", "magnitude"), ("cts-channels", "magnitude-2to4")])
def test_every_structure_ticket_is_the_model_of_a_later_run(cli, user, tmp_path, first, second):
    res = compress(cli, user, first, "a", "--set", "search.steps=4")
    assert res.exit_code == 0, res.output
    res = compress(cli, user, second, "b", model=tmp_path / "a" / "ticket.pt")
    assert res.exit_code == 0, res.output
    r1, r2 = (json.loads((tmp_path / o / "report.json").read_text()) for o in ("a", "b"))
    # the reloaded ticket is the first run's exported model: same accuracy on the same split
    assert r2["accuracy"]["dense"] == pytest.approx(r1["accuracy"]["onnx"], abs=1e-9)
    assert r2["model"]["conversions_before"] == [structures.get(r1["recipe"]["convert"]["structure"]).name]
    # and the second ticket still carries the first conversion, so it reloads again
    obj = torch.load(tmp_path / "b" / "ticket.pt", weights_only=True)
    assert [c["structure"] for c in obj["structures"]][0] == r1["recipe"]["convert"]["structure"]
    from ticketforge import ticket

    again = ticket.load(tmp_path / "b" / "ticket.pt")
    x = torch.rand(4, 1, 8, 8)
    import onnxruntime as ort
    s = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(again(x).numpy() - s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]).max() < 1e-3


def test_a_format1_blocks_ticket_still_loads(user, tmp_path):
    """Tickets written before the redesign held {"removed_blocks": [...]} as their single spec."""
    sys.path.insert(0, str(user))
    from ticketforge import ticket
    from ticketforge.structures.blocks.residual import remove_blocks
    import usermodels

    model = remove_blocks(usermodels.UserNet(), ["block"])
    torch.save({"state_dict": model.state_dict(), "arch": "usermodels:UserNet", "spec": {"removed_blocks": ["block"]}},
               tmp_path / "old.pt")
    again = ticket.load(tmp_path / "old.pt")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))


# ---------------------------------------------------------------- defect 2: search.start honoured or refused

@pytest.mark.parametrize("recipe", ["layers", "cts-channels", "magnitude-channels", "cts-2to4", "magnitude-2to4"])
def test_structure_methods_refuse_a_start_they_cannot_honour(cli, user, tmp_path, recipe):
    res = compress(cli, user, recipe, "out", "--set", "search.start=rewind")
    assert res.exit_code == 2
    assert "search.start" in res.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- defect 4: run keys follow the code

def test_editing_the_model_code_changes_the_run_key(tmp_path, monkeypatch):
    from ticketforge import models
    from ticketforge.runstate import run_key

    monkeypatch.syspath_prepend(str(tmp_path))
    src = "from torch import nn\n\ndef Net():\n    return nn.Linear(4, 2)\n"
    (tmp_path / "keymodel.py").write_text(src)
    models.import_callable("keymodel:Net", "--arch")
    before = run_key({"arch": "keymodel:Net"})
    assert before == run_key({"arch": "keymodel:Net"})
    (tmp_path / "keymodel.py").write_text(src.replace("(4, 2)", "(4, 3)"))
    assert run_key({"arch": "keymodel:Net"}) != before


def test_rerun_after_editing_forward_is_not_served_from_stale_stages(tmp_path):
    from tests._tiny import FAST as TINY, make_tiny

    make_tiny(tmp_path)
    args = [sys.executable, "-m", "ticketforge", "compress", "mlp.pt", "--recipe", "magnitude", "--epochs", "0",
            "--out", "res", *TINY]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    src = (tmp_path / "tinynet.py").read_text()
    (tmp_path / "tinynet.py").write_text(src.replace("nn.Linear(32, 10))", "nn.Linear(32, 10), nn.ReLU())"))
    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert "skipped every stage" not in second.stderr
    assert second.returncode == 2 and "--force" in second.stderr  # a different run: the folder is not ours to reuse


# ---------------------------------------------------------------- defect 5: channel runs have no sparsity target

def test_channel_report_has_no_sparsity_target(cli, user, tmp_path):
    res = compress(cli, user, "magnitude-channels", "out")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"]["target"] is None
    assert "target 90" not in (tmp_path / "out" / "report.md").read_text()
    assert "sparsity 0.9" not in res.output
    # defect 7: parity over real, distinct validation samples (64, or the whole split if smaller)
    assert report["parity_samples"] == min(64, report["data"]["val"])
    assert report["parity_mean"] <= report["parity"] < 1e-3


def test_sparsity_option_on_a_channel_recipe_is_refused():
    with pytest.raises(UserError, match="search.sparsity' is not used by search method 'cts' with structure 'channels'"):
        recipes.resolve("cts-channels", sparsity=0.9)


# ---------------------------------------------------------------- defect 6: sweeps go through the schema

def test_sweep_points_vary_the_structures_budget_through_the_schema():
    from ticketforge.sweep import point_recipes

    points = point_recipes(recipes.resolve("magnitude-channels"), [0.3, 0.6])
    assert [p.search.target_macs for p in points] == [0.3, 0.6]
    assert [p.search.sparsity for p in points] == [0.9, 0.9]  # untouched default, not the swept key
    with pytest.raises(UserError, match="nothing to sweep"):
        point_recipes(recipes.resolve("magnitude-2to4"), [0.5, 0.6])
    with pytest.raises(UserError, match="search.sparsity"):
        point_recipes(recipes.resolve("magnitude"), [0.5, 1.5])  # out of range, caught per point


# ---------------------------------------------------------------- defect 9: sanity variants train like the ticket

def test_sanity_variants_get_the_structures_training_hook(make_ctx, monkeypatch):
    from ticketforge import finetune, sanity
    from ticketforge.finetune import Schedule

    ctx = make_ctx(["search.method=magnitude", "search.sparsity=0.5"])
    res = structures.find_ticket(ctx)
    # the 2:4 structure's hook (mask decay), whatever ticket it is given
    ctx.recipe = recipes.resolve("magnitude-2to4", ["convert.nm_decay=exponential", "finetune.epochs=1"])
    seen = []
    real = finetune.fit

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mask_scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "fit", spy)
    structure = structures.get("2:4")
    sanity.run(res.model, res.mask, res.scores, ctx.loaded.fresh, ctx.recipe, Schedule.finetune(ctx.recipe),
               structure, ctx.data, ctx.device)
    assert seen and all(s is structure.mask_scale(ctx.recipe) is not None for s in seen)


# ---------------------------------------------------------------- recipes: per-method keys, names

def test_a_key_the_method_does_not_read_is_an_error_naming_the_method():
    with pytest.raises(UserError, match="search.objective.*'magnitude'"):
        recipes.resolve("magnitude", ["search.objective=ce"])
    with pytest.raises(UserError, match="convert.round_to.*'unstructured'"):
        recipes.resolve("magnitude", ["convert.round_to=8"])
    assert recipes.resolve("cts", ["search.objective=ce"]).search.objective == "ce"


def test_old_method_names_get_a_one_line_rename_message():
    with pytest.raises(UserError, match="'cts_2to4' is now called 'cts-2to4'"):
        recipes.resolve("magnitude", ["search.method=cts_2to4"])


def test_every_recipe_method_belongs_to_its_structure():
    from ticketforge.search import METHODS

    for name in recipes.builtin_names():
        r = recipes.resolve(name)
        assert r.search.method in structures.get(r.convert.structure).methods()
        assert r.search.method in METHODS
    # the old recipe name still works: CTS on blocks
    assert (recipes.resolve("layers").search.method, recipes.resolve("layers").convert.structure) == ("cts", "blocks")


# ---------------------------------------------------------------- imports: cheap commands load no torch

@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["recipes", "cts"], ["recipes", "layers"]])
def test_cheap_commands_do_not_import_torch(args):
    code = textwrap.dedent(f"""
        import sys
        from ticketforge.cli import cli
        try:
            cli({args!r}, standalone_mode=False)
        except SystemExit:
            pass
        heavy = [m for m in ("torch", "onnx", "onnxruntime", "torch_pruning") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_schema_modules_import_without_a_circle():
    code = "import ticketforge.recipe, ticketforge.search, ticketforge.structures, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
