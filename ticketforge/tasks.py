"""What a model's outputs are scored against: its task.

- `classify`: logits (batch, classes), one label per sample (images, features, a text classifier).
- `next-token`: a causal language model, logits (batch, seq, vocab); the target of position t is
  the token at t + 1 of the same sequence, so the data needs no labels.
- `tokens`: token classification, logits (batch, seq, classes), one label per token (y is N x L;
  -100 marks a position without a label, as Hugging Face writes it).

Every loss, distillation term and metric in ticketforge works on rows of logits and one target per
row. `rows` turns a sequence task's output into exactly that: the positions that count (attention
mask 1, a label there), flattened. So a per-token KL is the mean over real tokens, never padding,
and accuracy of a language model is next-token top-1 accuracy, with no second code path for
search, fine-tuning, IMP or validation. The task is decided once, when the model meets the data
(`infer`), kept in the model's io description (ticketforge.adapt), and read back with `of`."""
from __future__ import annotations

import math

import numpy as np
import torch

CLASSIFY, NEXT_TOKEN, TOKENS = "classify", "next-token", "tokens"
TASKS = (CLASSIFY, NEXT_TOKEN, TOKENS)
IGNORE = -100  # a token position without a label


def of(model) -> str:
    """The task of an adapted model (ticketforge.adapt keeps it on the module; copies keep it)."""
    return getattr(model, "ticketforge_task", CLASSIFY)


def sequence(task: str) -> bool:
    return task != CLASSIFY


def infer(out_dims: int, label_dims: int, labeled: bool, architectures: list[str] | None = None) -> str | None:
    """The task of a model returning `out_dims`-D logits on data whose labels are `label_dims`-D
    (`labeled` False: the data has none). None: model and labels do not fit (the caller explains)."""
    if out_dims == 2:
        return CLASSIFY if label_dims == 1 else None
    if out_dims != 3:
        return None
    if labeled:
        return TOKENS if label_dims == 2 else None
    if any(n.endswith("ForTokenClassification") for n in architectures or []):
        return TOKENS  # without labels: they become the dense model's top-1 per token
    return NEXT_TOKEN


def _ids_and_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (N, L) of a batch as ticketforge holds it: ids alone, or ids and
    mask packed as (N, 2, L) (ticketforge.data)."""
    if x.dim() == 3 and x.shape[1] == 2:
        return x[:, 0], x[:, 1].bool()
    return x, torch.ones_like(x, dtype=torch.bool)


def positions(task: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which logits count, their targets): a bool (N, L') over the output's positions and the
    targets there, flattened. Next token: the logits at 0..L-2 predict the ids at 1..L-1, both
    real tokens (so left or right padding both work)."""
    ids, mask = _ids_and_mask(x)
    if task == NEXT_TOKEN:
        keep = mask[:, 1:] & mask[:, :-1]
        return keep, ids[:, 1:][keep]
    keep = mask & (y != IGNORE) & (y >= 0)
    return keep, y[keep]


def rows(task: str, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
         teacher: torch.Tensor | None = None):
    """(logits as (rows, classes), one target per row, the teacher's logits at the same rows or None).
    For `classify` they are returned as they are."""
    if task == CLASSIFY:
        return logits, y, teacher
    keep, targets = positions(task, x.to(logits.device), y.to(logits.device))
    cut = (lambda t: t[:, :-1][keep]) if task == NEXT_TOKEN else (lambda t: t[keep])
    return cut(logits), targets, (cut(teacher) if teacher is not None else None)


def correct(task: str, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(rows whose top-1 is the target, rows) of one batch."""
    out, targets, _ = rows(task, logits, x, y)
    return int((out.argmax(-1) == targets).sum()), len(targets)


def perplexity(nll_sum: float, count: int) -> float:
    """exp of the mean next-token negative log-likelihood (nats)."""
    return math.exp(nll_sum / count) if count else float("nan")


def numpy_rows(task: str, logits: np.ndarray, x, y) -> tuple[np.ndarray, np.ndarray]:
    """`rows` for ONNX Runtime's numpy outputs."""
    out, targets, _ = rows(task, torch.from_numpy(np.asarray(logits)), torch.as_tensor(np.asarray(x)),
                           torch.as_tensor(np.asarray(y)))
    return out.numpy(), targets.numpy()
