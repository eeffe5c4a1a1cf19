"""The command line: a thin layer over ticketforge.pipeline and friends.

Exit codes (a contract): 0 success, 1 a verification or gate check failed (report written),
2 bad usage or bad input (one line, no traceback unless --debug)."""
from __future__ import annotations

import functools
import json
import sys
import threading
from pathlib import Path

import click

from ticketforge import __version__, gate, recipe as recipes
from ticketforge import errors
from ticketforge.errors import UserError, VerificationError
from ticketforge.ui import UI


def explain(exc: Exception) -> str | None:
    """One line for failures of the machine rather than of our code or the input: out of (GPU)
    memory, a full disk, a folder that cannot be written."""
    torch = sys.modules.get("torch")  # not imported for `recipes` and friends
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return ("out of GPU memory; try a smaller batch (--set finetune.batch_size=..., search.batch_size=..., "
                "train.batch_size=...) or --device cpu; nothing was written to the output folder")
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}; nothing was written to the output folder"
    return None


def guarded(fn):
    """Turn our errors into one line and an exit code; tracebacks only with --debug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        ui = UI()
        if threading.current_thread() is threading.main_thread():
            errors.install_sigterm()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if debug:
                raise
            ui.error(str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            ui.error("interrupted; nothing was written to the output folder (finished stages are kept: "
                     "the same command resumes)")
            sys.exit(143 if isinstance(exc, errors.Terminated) else 130)
        except Exception as exc:  # a bug of ours: still one line unless --debug
            if debug:
                raise
            known = explain(exc)
            if known is not None:
                ui.error(known)
                sys.exit(2)
            ui.error(f"{type(exc).__name__}: {exc} (internal error; run with --debug for the traceback)")
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ticketforge")
def cli():
    """ticketforge: find a winning ticket in a trained model, make it small and fast, export and prove it."""


def parse_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--arch-kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


# A plug-in registers what it defines (a structure: ticketforge.structures.register) when imported.
PLUGIN = click.option("--plugin", "plugins", multiple=True, envvar="TICKETFORGE_PLUGINS", metavar="MODULE",
                      help="import this module first (from the current directory), e.g. one that registers a "
                           "structure; repeatable (env TICKETFORGE_PLUGINS, separated by spaces)")


def load_plugins(names) -> None:
    from ticketforge.registry import import_user_module

    for name in names:
        import_user_module(name, "--plugin")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_name", required=True, help="built-in recipe name or YAML path")
@click.option("--data", help="digits, a .npz file, or package.module:callable (default: what the checkpoint says)")
@click.option("--arch", help="built-in model name or package.module:callable")
@click.option("--arch-kwargs", help="JSON object of keyword arguments for --arch")
@click.option("--sparsity", type=float, help="fraction of prunable weights removed (search.sparsity; "
              "unstructured and 2:4 recipes)")
@click.option("--epochs", type=int, help="fine-tune epochs (finetune.epochs)")
@click.option("--set", "sets", multiple=True, metavar="KEY.PATH=VALUE", help="override any recipe key")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default exported/<model>-<recipe>)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="held-out fraction when the data has no validation split")
@click.option("--trust-pickle", is_flag=True, help="allow loading a pickled nn.Module (runs code from the file)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.option("--json", "as_json", is_flag=True, help="print report.json on stdout")
@click.option("--junit", type=click.Path(path_type=Path), help="write the gate's checks as JUnit XML here")
@click.option("--sanity", is_flag=True, help="also train the sanity-check tickets (shuffled, inverted, "
              "re-initialised) and report their accuracy (search.sanity)")
@PLUGIN
@click.option("--debug", is_flag=True, help="show tracebacks")
@guarded
def compress(model, recipe_name, data, arch, arch_kwargs, sparsity, epochs, sets, out, device, seed, val_fraction,
             trust_pickle, force, quiet, as_json, junit, sanity, plugins, debug):
    """Compress MODEL with a recipe: search, fine-tune, convert, export, validate."""
    from ticketforge.pipeline import Job, compress as run_compress, default_out

    load_plugins(plugins)
    recipe = recipes.resolve(recipe_name, list(sets) + (["search.sanity=true"] if sanity else []),
                             sparsity=sparsity, epochs=epochs)
    job = Job(model_path=model, recipe=recipe, data=data, out=out, arch=arch, arch_kwargs=parse_kwargs(arch_kwargs),
              trust_pickle=trust_pickle, device=device, seed=seed, force=force, val_fraction=val_fraction,
              ui=UI(quiet=quiet))
    gate.check_junit_path(junit)
    report = run_compress(job)
    if report is None:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))
    out = Path(job.out or default_out(model, recipe))
    gate.append_step_summary((out / "report.md").read_text())
    finish_gate(report["gate"], junit)


# sweep takes compress's options (one definition of each), less those that name a single point.
_SWEEP_SHARED = ("model", "recipe_name", "data", "arch", "arch_kwargs", "epochs", "sets", "device", "seed",
                 "val_fraction", "trust_pickle", "force", "quiet", "plugins", "debug")


@cli.command("sweep", params=[p for p in compress.params if p.name in _SWEEP_SHARED])
@click.option("--points", "--sparsities", "points", required=True,
              help="comma-separated values of the structure's budget key (search.sparsity for unstructured "
                   "recipes, search.target_macs for channels and blocks), e.g. 0.5,0.8,0.9,0.95,0.98")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default exported/<model>-<recipe>-sweep)")
@guarded
def sweep_cmd(model, recipe_name, data, arch, arch_kwargs, epochs, sets, device, seed, val_fraction, trust_pickle,
              force, quiet, plugins, debug, points, out):
    """Compress MODEL at several budgets; write a table and a plot of accuracy vs latency and size."""
    from ticketforge.pipeline import Job
    from ticketforge.sweep import parse_points, sweep

    load_plugins(plugins)
    points = parse_points(points)
    recipe = recipes.resolve(recipe_name, list(sets), epochs=epochs)
    job = Job(model_path=model, recipe=recipe, data=data, arch=arch, arch_kwargs=parse_kwargs(arch_kwargs),
              trust_pickle=trust_pickle, device=device, seed=seed, force=force, val_fraction=val_fraction,
              ui=UI(quiet=quiet))
    sweep(job, points, out)


def finish_gate(result: dict, junit: Path | None) -> None:
    """JUnit file if asked, then exit 1 naming the failed checks (the output is already written)."""
    if junit is not None:
        gate.write_junit(result, junit)
    failed = [f"{c['name']} (measured {c['measured']:.4g}, threshold {c['threshold']:g})"
              for c in result["checks"] if not c["passed"]]
    if failed:
        raise VerificationError(f"gate failed: {'; '.join(failed)}")


@cli.command("gate")
@click.argument("report_path", metavar="REPORT.json", type=click.Path(path_type=Path))
@click.option("--max-accuracy-drop", type=float, help="dense minus exported accuracy, at most (0.01 = one point)")
@click.option("--min-speedup", type=float, help="speed-up over dense, at least (low end of its 95% interval), "
              "for every backend and batch")
@click.option("--max-latency-ms", type=float, help="compressed latency in ms, at most (high end of its 95% interval), "
              "for every backend and batch")
@click.option("--max-size-mb", type=float, help="size of model.onnx in MB, at most")
@click.option("--min-sparsity", type=float, help="sparsity of model.onnx's prunable weights, at least")
@click.option("--batch", type=click.IntRange(min=1), help="check --min-speedup and --max-latency-ms only at this batch "
              "size (default: the recipe's gate.batch, else every batch)")
@click.option("--junit", type=click.Path(path_type=Path), help="write the checks as JUnit XML here")
@click.option("--json", "as_json", is_flag=True, help="print the gate section as JSON on stdout")
@click.option("--debug", is_flag=True, help="show tracebacks")
@guarded
def gate_cmd(report_path, max_accuracy_drop, min_speedup, max_latency_ms, max_size_mb, min_sparsity, batch, junit,
             as_json, debug):
    """Re-check an existing report.json against thresholds, without recomputing anything.

    Thresholds come from the report's recipe `gate` section; options override them.
    Exit 0 when every check passes, 1 when one fails, 2 on bad input."""
    gate.check_junit_path(junit)
    report = gate.load_report(report_path)
    thresholds = dict(report.recipe.get("gate") or {})
    flags = {"max_accuracy_drop": max_accuracy_drop, "min_speedup": min_speedup, "max_latency_ms": max_latency_ms,
             "max_size_mb": max_size_mb, "min_sparsity": min_sparsity, "batch": batch}
    thresholds.update({k: v for k, v in flags.items() if v is not None})
    result = gate.evaluate(report, thresholds)
    md = gate.to_markdown(result)
    click.echo(json.dumps(result, indent=2) if as_json else md.rstrip("\n"))
    gate.append_step_summary(f"### ticketforge gate: {report_path}\n\n{md}")
    finish_gate(result, junit)


_TIMING = recipes.ValidateConfig()  # bench's defaults are the report's


@cli.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--compare", type=click.Path(path_type=Path), metavar="BASELINE.onnx",
              help="also time this model (e.g. dense.onnx) interleaved with MODEL and report MODEL's speed-up over it")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True,
              help="batch size, repeatable (default: 1 and 64)")
@click.option("--threads", type=click.IntRange(min=0), default=_TIMING.threads, show_default=True,
              help="ONNX Runtime intra-op threads (0: every core)")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=_TIMING.max_seconds,
              show_default=True, help="time cap per batch size")
@click.option("--ci-target", type=click.FloatRange(min=0, min_open=True), default=_TIMING.ci_target,
              show_default=True, help="stop once the 95% interval is within +- this fraction")
@click.option("--min-runs", type=click.IntRange(min=3), default=_TIMING.repeats, show_default=True,
              help="timed runs (pairs with --compare) before the interval may stop the timing")
@click.option("--warmup", type=click.IntRange(min=0), default=_TIMING.warmup, show_default=True,
              help="untimed runs of each session first")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="size of a named free input dimension, e.g. --dim sequence=128 (repeatable)")
@click.option("--provider", default="CPUExecutionProvider", show_default=True, help="ONNX Runtime execution provider")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")
@click.option("--debug", is_flag=True, help="show tracebacks")
@guarded
def bench(model, compare, batches, threads, max_seconds, ci_target, min_runs, warmup, dims, provider, as_json, debug):
    """Time MODEL.onnx in ONNX Runtime (with --compare, its speed-up over another model), each number
    with its 95% interval. Needs only onnxruntime and numpy: run it on the target device."""
    from ticketforge import benchmark, latency  # onnxruntime, never torch

    settings = latency.Settings(min_runs=min_runs, warmup=warmup, max_seconds=max_seconds, ci_target=ci_target,
                                threads=threads)
    result = benchmark.run(model, compare, list(batches) or [1, 64], settings, benchmark.parse_dims(dims), provider)
    click.echo(json.dumps(result, indent=2) if as_json else benchmark.to_text(result))


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("exported/demo-cts"), show_default=True,
              help="output folder of the compressed demo model")
@click.option("--model-out", type=click.Path(path_type=Path), default=Path("exported/demo.pt"), show_default=True,
              help="where the trained dense demo model is saved")
@click.option("--recipe", "recipe_name", default="cts", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="replace existing outputs")
@click.option("--quiet", is_flag=True)
@click.option("--debug", is_flag=True)
@guarded
def demo(out, model_out, recipe_name, seed, force, quiet, debug):
    """Train the built-in model on scikit-learn's digits, then compress it (a few minutes on a CPU)."""
    from ticketforge.demo import train_demo_model
    from ticketforge.pipeline import Job, compress as run_compress, refuse_existing

    for path in (out, model_out):
        if path.exists() and not force:
            refuse_existing(path)
    recipe = recipes.resolve(recipe_name)
    ui = UI(quiet=quiet)
    train_demo_model(model_out, seed=seed, ui=ui)
    ui.log(f"next, the same as: ticketforge compress {model_out} --recipe {recipe_name} --out {out}")
    run_compress(Job(model_path=model_out, recipe=recipe, out=out, seed=seed, force=force, ui=ui))


@cli.command("recipes")
@click.argument("name", required=False)
@click.option("--debug", is_flag=True)
@guarded
def list_recipes(name, debug):
    """List the built-in recipes, or print one."""
    if name:
        click.echo(recipes.builtin_text(name), nl=False)
        return
    for n in recipes.builtin_names():
        r = recipes.resolve(n)
        click.echo(f"{n:<20} {r.description}")
    for alias, n in sorted(recipes.ALIASES.items()):
        click.echo(f"{alias:<20} the same as {n}")


@cli.command("structures")
@PLUGIN
@click.option("--debug", is_flag=True)
@guarded
def list_structures(plugins, debug):
    """List the structures a ticket can become (convert.structure) and the methods that search each."""
    from ticketforge.structures import STRUCTURES

    load_plugins(plugins)
    for name, s in STRUCTURES.items():
        click.echo(f"{name:<14} {s.summary}")
        click.echo(f"{'':<14} methods: {', '.join(s.methods())}; budget keys: {', '.join(s.budget_keys)}")


@cli.command("models")
def list_models():
    """List the built-in architectures (for --arch)."""
    from ticketforge.models import MODELS

    for name, fn in sorted(MODELS.items()):
        click.echo(f"{name:<20} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")


def main():
    cli(prog_name="ticketforge")
