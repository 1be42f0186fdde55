"""``update_probe``: an honest-but-curious server that measures what it is handed.

The simplest server-side observer. It reads only the messages the transport
delivered and reports the L2 norm of each plain update, or counts the updates it
could not read (ciphertexts, masked vectors). It is the reference the real
observer attacks (gradient inversion, server-side membership inference) follow.
"""

from __future__ import annotations

import numpy as np

from fedsec_bench.messages import Message, RoundContext
from fedsec_bench.plugins import Plugin
from fedsec_bench.updates import l2_norm


class UpdateProbe(Plugin):
    name = "update_probe"
    kind = "attack"
    summary = "server-side observer: norms of the updates the server can read"
    on_instruction_data = "reads update norms only; the same on every data format"

    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float]:
        readable = [m.payload for m in messages if m.is_plain]
        norms = [l2_norm(u) for u in readable]
        return {
            "probe.readable_fraction": len(readable) / len(messages) if messages else 0.0,
            "probe.update_norm_max": max(norms) if norms else float("nan"),
            "probe.update_norm_mean": float(np.mean(norms)) if norms else float("nan"),
        }
