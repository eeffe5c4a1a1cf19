"""Time and accuracy of the built-in `cts` recipe on the benchmark model (bench/cts_vs_ltr.py's
MNIST-1D CNN), for comparing two versions of ticketforge on the same machine state: run it under
each version's PYTHONPATH, alternately (see README, "How long CTS searches"). Only uses APIs that
both versions have. Prints one JSON line per point.

    PYTHONPATH=OLD python bench/cts_search_time.py --tag before
    PYTHONPATH=.   python bench/cts_search_time.py --tag after
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cts_vs_ltr import mnist1d_bundle  # noqa: E402  (registers the mnist1d-cnn model)

from ticketforge import finetune, models, recipe as recipes, search  # noqa: E402
from ticketforge.finetune import Schedule  # noqa: E402
from ticketforge.search.base import SearchContext  # noqa: E402
from ticketforge.data import loader  # noqa: E402
from ticketforge.loading import LoadedModel  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tag", required=True)
p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
p.add_argument("--seeds", nargs="+", type=int, default=[0])
p.add_argument("--epochs", type=int, default=8)
p.add_argument("--set", dest="sets", action="append", default=[], help="recipe override, KEY=VALUE")
args = p.parse_args()
torch.set_num_threads(1)
device = torch.device("cpu")
bundle = mnist1d_bundle()
for seed in args.seeds:
    torch.manual_seed(seed)
    dense = models.build("mnist1d-cnn")
    finetune.train(dense, loader(bundle.train, 128, shuffle=True, seed=seed), epochs=args.epochs, lr=0.1, device=device)
    dense.eval()
    for s in args.sparsities:
        recipe = recipes.resolve("cts", args.sets, sparsity=s, epochs=3)
        model = copy.deepcopy(dense)
        ctx = SearchContext(model=model, loaded=LoadedModel(model=model, arch="mnist1d-cnn"), data=bundle,
                            recipe=recipe, device=device, seed=seed)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        found = search.run(ctx)
        t1 = time.perf_counter()
        acc = finetune.fit(found.model, found.mask, found.schedule or Schedule.finetune(recipe), bundle, device,
                           seed=seed, bn_recalibrate=recipe.finetune.bn_recalibrate).accuracy
        print(json.dumps({"tag": args.tag, "sets": args.sets, "seed": seed, "sparsity": s, "search_s": round(t1 - t0, 2),
                          "steps": found.info["steps"], "stop": (found.info.get("stop") or {}).get("reason"),
                          "accuracy": acc}), flush=True)
