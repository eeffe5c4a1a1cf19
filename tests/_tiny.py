"""A tiny trained MLP on scikit-learn's digits, for tests that run the whole pipeline in
subprocesses (torchrun, kill and resume): small enough that a run takes a few seconds."""
from pathlib import Path

import torch

MODULE = '''
from torch import nn

def Net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
'''


def make_tiny(folder: Path) -> Path:
    """Writes tinynet.py (the architecture, --arch tinynet:Net) and mlp.pt (its trained state_dict)."""
    import sys

    from ticketforge import finetune
    from ticketforge.data import load_data, loader

    (folder / "tinynet.py").write_text(MODULE)
    sys.path.insert(0, str(folder))
    try:
        import tinynet
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    model = tinynet.Net()
    bundle = load_data("digits", 0.1, 0)
    finetune.train(model, loader(bundle.train, 64, shuffle=True), epochs=3, lr=0.1, device=torch.device("cpu"))
    sys.modules.pop("tinynet", None)
    torch.save(model.state_dict(), folder / "mlp.pt")
    return folder / "mlp.pt"


FAST = ["--arch", "tinynet:Net", "--data", "digits", "--device", "cpu", "--set", "validate.repeats=3",
        "--set", "validate.warmup=0", "--set", "validate.latency_batches=[1]"]


def cli_subprocess(folder: Path, *args: str):
    """`python -m ticketforge ARGS` in `folder`, in a fresh process (a plug-in it registers stays
    out of the test process's registry); the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ticketforge", *args], cwd=folder, capture_output=True, text=True,
                          timeout=600)
