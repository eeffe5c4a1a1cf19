"""The channel recipes end to end on a small residual CNN with a depthwise conv (no training, a
few search steps): the MAC budget holds in the exported ONNX with counts in multiples of
round_to, the shrunk model computes what the masked one did, and an unstructured ticket converts."""
import json

import pytest
import torch

from ticketforge import models, ticket
from ticketforge.pipeline import Job, compress
from ticketforge.recipe import resolve
from ticketforge.ui import SILENT


def run(recipe, *sets):
    torch.save(models.build("digits-resnet", {"width": 16}).state_dict(), "m.pt")
    r = resolve(recipe, ["finetune.epochs=0", "validate.repeats=3", "validate.warmup=1", "validate.max_seconds=0.5", *sets])
    job = Job(model_path="m.pt", recipe=r, data="digits", arch="digits-resnet", arch_kwargs={"width": 16},
              out="out", ui=SILENT)
    return compress(job)


@pytest.mark.parametrize("recipe,sets", [("cts-channels", ["search.steps=4"]), ("magnitude-channels", [])])
def test_channel_recipe_meets_budget(recipe, sets):
    report = run(recipe, *sets)
    assert report["macs"]["compressed"] <= 0.55 * report["macs"]["dense"]
    assert report["convert"]["max_logit_diff_vs_masked"] < 1e-4
    kept = report["convert"]["kept_channels"]
    sizes = report["convert"]["group_sizes"]
    assert all(k % 16 == 0 or k == sizes[g] for g, k in kept.items())
    again = ticket.load("out/ticket.pt")
    assert sum(p.numel() for p in again.parameters()) < sum(
        p.numel() for p in models.build("digits-resnet", {"width": 16}).parameters())
    assert json.load(open("out/report.json"))["convert"]["structure"] == "channels"


def test_unstructured_ticket_converts_to_channels():
    # SNIP scores weights only: its weight-level ticket is turned into channels (magnitude would score
    # the channels themselves)
    report = run("magnitude", "search.method=snip", "convert.structure=channels", "search.sparsity=0.5")
    assert report["macs"]["compressed"] <= 0.55 * report["macs"]["dense"]
    assert any("not channel-structured" in n for n in report["notes"])


def test_cts_channels_below_the_smallest_selection_searches_at_it():
    """A ViT whose parts no group holds cost more than the target: the gates once started with a
    budget of 0 (ZeroDivisionError in the balance); the search now aims at the smallest selection and
    the report says the target was out of reach."""
    kwargs = {"in_channels": 1, "image_size": 8, "patch_size": 2, "dim": 32, "depth": 2, "heads": 4}
    torch.save(models.build("vit", kwargs).state_dict(), "vit.pt")
    r = resolve("cts-channels", ["finetune.epochs=0", "search.steps=3", "validate.repeats=3", "validate.warmup=1",
                                 "validate.max_seconds=0.5", "search.target_macs=0.3"])
    report = compress(Job(model_path="vit.pt", recipe=r, data="digits", arch="vit", arch_kwargs=kwargs, out="out",
                          ui=SILENT))
    assert report["macs"]["compressed"] < report["macs"]["dense"]
    assert any("above search.target_macs 0.3" in n for n in report["notes"])
