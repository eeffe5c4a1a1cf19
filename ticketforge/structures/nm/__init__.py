"""N:M sparsity, registered as 2:4 for NVIDIA sparse tensor cores: in every group of M weights along
the reduction dimension of each eligible layer, N are kept. The zeros stay in dense tensors (as apex
ASP and ModelOpt export them); a runtime with sparse kernels (TensorRT with SPARSE_WEIGHTS on Ampere
or newer) compresses them. Another pattern is a subclass with its own `name` and `pattern` (see
ticketforge/structures/nm48.py). The pattern logic is pattern.py, the search search.py."""
from __future__ import annotations

from ticketforge.errors import UserError, VerificationError
from ticketforge.structures import Converted, Structure, register
from ticketforge.structures.nm.layout import TWO_FOUR, Pattern


@register
class NM(Structure):
    name = "2:4"
    summary = "2 of every 4 weights zero, for sparse tensor cores (TensorRT on Ampere or newer)"
    pattern: Pattern = TWO_FOUR
    units = "weights"
    budget_keys = ("sparsity", "max_size_mb")
    fixed_keys = ("sparsity",)  # fixed at 1 - N/M; accepted so that recipes may say so
    convert_keys = ("nm_decay", "prune_lm_head")
    sparse_kernels = True
    runtime_note = ("2:4 zeros make no CPU runtime faster (measured 0.98-1.04x); the speed-up needs sparse tensor "
                    "cores: TensorRT >= 8 with SPARSE_WEIGHTS (trtexec --sparsity=enable) on Ampere or newer")

    @property
    def density(self) -> float:
        return self.pattern.n / self.pattern.m

    def check(self, recipe) -> None:
        super().check(recipe)
        p = self.pattern
        if recipe.search.sparsity != 1 - self.density:
            raise UserError(f"recipe keys 'convert.structure' ({self.name}) and 'search.sparsity': {p} keeps {p.n} of "
                            f"every {p.m} weights in each eligible layer, so search.sparsity must be "
                            f"{1 - self.density:g}, got {recipe.search.sparsity:g}")

    def budget(self, recipe) -> str:
        from ticketforge import budget

        p = self.pattern
        return f"{p.n} of every {p.m} weights in each eligible layer" + (f", {budget.describe(recipe)}"
                                                                          if budget.key(recipe) else "")

    def target_sparsity(self, recipe):
        return 1 - self.density

    def search(self, ctx, method):
        from ticketforge.structures.nm.search import search

        return search(ctx, method, self.pattern)

    def mask_scale(self, recipe):
        if recipe.convert.nm_decay == "exponential":
            from ticketforge.structures.nm.pattern import pgf_scale

            return pgf_scale
        return None

    def convert(self, model, mask, recipe, example) -> Converted:
        from ticketforge.structures.nm import pattern

        p = self.pattern
        if mask is None:
            raise VerificationError(f"{p} conversion got no mask: search it with a method that scores weights "
                                    f"({', '.join(self.methods())})")
        mask.apply(model)
        state = pattern.summary(model, p)
        if state["bad_groups"]:
            raise VerificationError(f"{p}: {state['bad_groups']} of {state['groups']} weight groups in eligible "
                                    f"layers have more than {p.n} non-zeros after fine-tuning")
        notes = [self.runtime_note]
        if state["ineligible"]:
            notes.append(f"{p}: {len(state['ineligible'])} layer(s) left dense, not eligible "
                         f"(out % {p.out_multiple}, in % {max(p.in_multiple, p.m)}): "
                         f"{', '.join(state['ineligible'])}")
        whole = pattern.whole_layers(model)
        if whole:
            notes.append(f"{p}: a language model's head left dense: {', '.join(whole)} (convert.prune_lm_head; "
                         "a head tied to the input embedding is never pruned)")
        return Converted(model=model, mask=mask, info={"structure": self.name, **state, "notes": notes,
                                                       **({"whole_layers": whole} if whole else {})})

    def verify(self, onnx_path, dense_onnx_path, converted, recipe):
        from ticketforge.structures.nm import pattern

        return pattern.read_back(onnx_path, converted.info, recipe.convert.nm_decay, self.pattern)

    def render(self, section: dict) -> list[str]:
        back = section["onnx"]
        return [f"{section['pattern']}: {back['valid']:,} of {back['groups']:,} weight groups in {back['layers']} "
                f"eligible layers of `model.onnx` satisfy {section['pattern']} ({back['fraction_valid']:.2%}); "
                f"{len(section['ineligible_layers'])} layer(s) left dense (not eligible); mask decay "
                f"`{section['decay']}`."]

    def gate_checks(self, section: dict) -> list[dict]:
        back = section["onnx"]
        return [{"name": f"pattern[{section['pattern']}, model.onnx]", "threshold": 1.0,
                 "measured": round(float(back["fraction_valid"]), 6), "passed": back["bad"] == 0,
                 "measured_as": "fraction of eligible weight groups read back from model.onnx that hold the pattern"}]
