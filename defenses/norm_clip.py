"""``norm_clip``: each client clips its update to an L2 norm before sending it.

This is the client-side half of norm bounding (Sun et al. 2019, "Can you really
backdoor federated learning?") and of DP-FedAvg's clipping; alone it gives no formal
privacy, but bounds how far any one client can move the model.
"""

from __future__ import annotations

from pydantic import Field

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, RoundContext, State
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import clip_to_norm


class NormClipOptions(Options):
    max_norm: float = Field(1.0, gt=0, description="L2 bound on each client's whole update.")


class NormClip(Plugin):
    name = "norm_clip"
    kind = "defense"
    summary = "clip each client's update to L2 norm max_norm (client side)"
    on_instruction_data = "acts on the update only; the same on every data format"
    OptionsModel = NormClipOptions

    def client_update(self, client: ClientContext, update: State) -> State:
        clipped, client.metrics["norm_clip.pre_clip_norm"] = clip_to_norm(update, self.options.max_norm)
        return clipped

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float] | None:
        """How often the bound bit, from the norms before clipping (which only the clients saw)."""
        norms = list(truth.client_values("norm_clip.pre_clip_norm").values())
        if not norms:
            return None
        clipped = sum(n > self.options.max_norm for n in norms)
        return {"norm_clip.clipped_fraction": clipped / len(norms), "norm_clip.max_pre_clip_norm": max(norms)}
