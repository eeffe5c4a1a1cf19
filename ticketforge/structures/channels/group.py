"""What a channel group is: coupled channels of several modules that are removed together
(graph.py finds them, heads.py finds attention heads as groups of their own)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Member:
    module: str        # module name in the model (a parameter's name for kind "param")
    kind: str          # "out": a Conv/Linear producing the channels (depthwise too), "in": one reading them,
                       # "norm", "param": a per-unit table (its last dimension; ticketforge.structures.channels.heads)
    idx: list[int]     # indices along the pruned dimension of this module
    root: list[int]    # the group unit each index belongs to
    part: str = ""     # which part of a fused projection these rows are (GPT-2's c_attn: "q", "k", "v")


@dataclass
class ChannelGroup:
    root: str          # the Conv/Linear the group was found from (for heads: the attention module)
    size: int          # units in the group: channels, or attention heads
    members: list[Member]
    unit: int = 1      # channels per unit (a head's width)
    gate: tuple[str, ...] = ()  # modules ("module", or "module:part") whose rows a CTS gate scales
                                # (default: the norms, else the producers)
    kind: str = "channels"      # or "heads"

    def of(self, kind: str) -> list[Member]:
        return [m for m in self.members if m.kind == kind]

    def gated(self) -> list[Member]:
        if self.gate:
            return [m for m in self.members if (f"{m.module}:{m.part}" if m.part else m.module) in self.gate]
        return self.of("norm") or self.of("out")
