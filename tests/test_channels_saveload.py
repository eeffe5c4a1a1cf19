"""Peer complaint 4: save/load loses the pruned structure. A shrunk model is saved as plain data
(architecture spec + state_dict) and rebuilt with torch.load(weights_only=True)."""
import torch

from ticketforge import models, ticket
from ticketforge.structures.channels import spec
from ticketforge.loading import load_model
from tests.channel_nets import masked_and_shrunk, randomize_bn


def shrunk_builtin():
    model = randomize_bn(models.build("digits-resnet", {"width": 16}))
    x = torch.randn(4, 1, 8, 8)
    *_, shrunk = masked_and_shrunk(model, x)
    return shrunk, x


def test_ticket_reloads_without_pickles(tmp_path):
    shrunk, x = shrunk_builtin()
    ticket.save(tmp_path / "ticket.pt", shrunk, None, arch="digits-resnet", arch_kwargs={"width": 16},
                conversions=[{"structure": "channels", "spec": spec.arch_spec(shrunk)}], recipe={})
    obj = torch.load(tmp_path / "ticket.pt", weights_only=True)  # plain data only
    assert obj["structures"][0]["spec"]["modules"]["1.body.0.0"]["out_channels"] == 8
    again = ticket.load(tmp_path / "ticket.pt")
    with torch.no_grad():
        assert torch.equal(again(x), shrunk(x))
    # the same file is a model ticketforge compress accepts
    via_cli_loader = load_model(tmp_path / "ticket.pt").model.eval()
    with torch.no_grad():
        assert torch.equal(via_cli_loader(x), shrunk(x))


def test_plain_state_dict_does_not_fit_the_class(tmp_path):
    """Why the spec is needed: the original class rejects the shrunk state_dict."""
    shrunk, _ = shrunk_builtin()
    fresh = models.build("digits-resnet", {"width": 16})
    try:
        fresh.load_state_dict(shrunk.state_dict())
    except RuntimeError as exc:
        assert "size mismatch" in str(exc)
    else:
        raise AssertionError("a shrunk state_dict loaded into the dense class")


def test_ticket_without_arch_is_a_clear_error(tmp_path):
    shrunk, _ = shrunk_builtin()
    torch.save({"state_dict": shrunk.state_dict(), "arch": None, "spec": spec.arch_spec(shrunk)},
               tmp_path / "t.pt")
    import pytest
    from ticketforge.errors import UserError
    with pytest.raises(UserError, match="does not name its architecture"):
        ticket.load(tmp_path / "t.pt")
