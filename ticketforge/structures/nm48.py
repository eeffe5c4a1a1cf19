"""4:8 sparsity: 4 of every 8 weights along the reduction dimension kept. The same density as 2:4,
with 70 ways to keep 4 of 8 against 2:4's 6 per group of 4 (36 per 8), so the mask can follow the
weights more closely. No NVIDIA kernel runs it: it is for runtimes and accelerators with wider N:M
support, and a step between unstructured and 2:4 in accuracy."""
from ticketforge.structures import register
from ticketforge.structures.nm import NM
from ticketforge.structures.nm.layout import Pattern


@register
class FourEight(NM):
    name = "4:8"
    summary = "4 of every 8 weights zero (N:M wider than 2:4; no NVIDIA sparse kernel runs it)"
    pattern = Pattern(4, 8)
    sparse_kernels = False
    runtime_note = ("4:8 zeros make no dense runtime faster, and NVIDIA's sparse tensor cores run 2:4 only: "
                    "the model is smaller when stored sparsely or compressed")
