import pytest

from ticketforge import recipe
from ticketforge.errors import UserError


@pytest.mark.parametrize("name", recipe.builtin_names())
def test_builtin_recipes_are_valid(name):
    r = recipe.resolve(name)
    assert r.name == name and r.description


def test_overrides_and_shortcuts():
    r = recipe.resolve("magnitude", ["search.sparsity=0.5", "finetune.lr=1e-3", "gate.max_accuracy_drop=0.02"],
                       epochs=2)
    assert r.search.sparsity == 0.5 and r.finetune.lr == 1e-3 and r.finetune.epochs == 2
    assert r.gate.max_accuracy_drop == 0.02
    assert recipe.resolve("magnitude", sparsity=0.25).search.sparsity == 0.25


@pytest.mark.parametrize("item,words", [
    ("search.nope=1", ["search.nope", "allowed"]),
    ("nope.x=1", ["nope"]),
    ("search.sparsity=1.0", ["search.sparsity", "range"]),
    ("search.sparsity=-0.1", ["search.sparsity", "range"]),
    ("finetune.epochs=-1", ["finetune.epochs", "range"]),
    ("finetune.epochs=two", ["finetune.epochs", "integer"]),
    ("search.method=nope", ["search.method", "magnitude"]),
    ("search.objective=mse", ["search.objective", "reverse_kl"]),
    ("search", ["key.path=value"]),
])
def test_bad_values_name_the_key(item, words):
    with pytest.raises(UserError) as exc:
        recipe.resolve("magnitude", [item])
    for w in words:
        assert w in str(exc.value)


def test_recipe_file(tmp_path):
    (tmp_path / "r.yaml").write_text("search: {method: magnitude, sparsity: 0.3}\n")
    r = recipe.resolve(str(tmp_path / "r.yaml"))
    assert r.name == "r" and r.search.sparsity == 0.3
    (tmp_path / "bad.yaml").write_text("search: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        recipe.resolve(str(tmp_path / "bad.yaml"))
