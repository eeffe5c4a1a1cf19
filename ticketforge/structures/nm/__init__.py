"""2:4 (N:M) sparsity for NVIDIA sparse tensor cores: in every group of 4 weights along the
reduction dimension of each eligible layer, 2 are zero. The zeros stay in dense tensors (as apex
ASP and ModelOpt export them); a runtime with sparse kernels (TensorRT with SPARSE_WEIGHTS on
Ampere or newer) compresses them. The pattern logic is pattern.py."""
from __future__ import annotations

from ticketforge.errors import UserError, VerificationError
from ticketforge.structures import Converted, Structure


class NM(Structure):
    name = "2:4"
    summary = "2 of every 4 weights zero, for sparse tensor cores (TensorRT on Ampere or newer)"
    methods = ("magnitude-2to4", "cts-2to4")
    budget_keys = ("sparsity", "max_size_mb")
    fixed_keys = ("sparsity",)  # fixed at 0.5; accepted so that recipes may say so
    convert_keys = ("nm_decay",)
    sparse_kernels = True

    def check(self, recipe) -> None:
        super().check(recipe)
        if recipe.search.sparsity != 0.5:
            raise UserError(f"recipe key 'search.sparsity': 2:4 keeps 2 of every 4 weights in each eligible "
                            f"layer, so it must be 0.5, got {recipe.search.sparsity:g}")

    def budget(self, recipe) -> str:
        from ticketforge import budget

        return "2 of every 4 weights in each eligible layer" + (f", {budget.describe(recipe)}"
                                                                  if budget.key(recipe) else "")

    def target_sparsity(self, recipe):
        return 0.5

    def mask_scale(self, recipe):
        if recipe.convert.nm_decay == "exponential":
            from ticketforge.structures.nm.pattern import pgf_scale

            return pgf_scale
        return None

    def convert(self, model, mask, recipe, example) -> Converted:
        from ticketforge.structures.nm import pattern

        if mask is None:
            raise VerificationError("2:4 conversion got no mask: use a 2:4 search method (magnitude-2to4, cts-2to4)")
        mask.apply(model)
        state = pattern.summary(model)
        if state["bad_groups"]:
            raise VerificationError(f"2:4: {state['bad_groups']} of {state['groups']} weight groups in eligible "
                                    "layers have more than 2 non-zeros after fine-tuning")
        notes = ["2:4 zeros make no CPU runtime faster (measured 0.98-1.04x); the speed-up needs sparse tensor "
                 "cores: TensorRT >= 8 with SPARSE_WEIGHTS (trtexec --sparsity=enable) on Ampere or newer"]
        if state["ineligible"]:
            notes.append(f"2:4: {len(state['ineligible'])} layer(s) left dense, not eligible "
                         f"(out % 8, in % 16): {', '.join(state['ineligible'])}")
        return Converted(model=model, mask=mask, info={"structure": self.name, **state, "notes": notes})

    def verify(self, onnx_path, dense_onnx_path, converted, recipe):
        from ticketforge.structures.nm import pattern

        return {"nm": pattern.read_back(onnx_path, converted.info, recipe.convert.nm_decay)}
