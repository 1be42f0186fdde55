"""What encrypted and masked aggregation cost against what they replace, measured in one run.

    python benchmarks/transport_costs.py

- he_aggregation: every client's encryption, the server's encrypted weighted sum and the
  decryption for 10 clients of 8·4096 parameters, against raw TenSEAL (ckks_vector encrypt,
  add, decrypt) on the same vectors: parameters per second and the ratio to raw.
- secure_aggregation: every client's masking and the server's unmasking for 10 clients of
  100,000 parameters, against plaintext FedAvg of the same updates: the overhead ratio.

Each figure is the fastest of 5 repeats (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import tenseal as ts
import torch

from fedsec_bench.aggregation import fedavg
from fedsec_bench.defenses.he_aggregation import HEAggregation, HEAggregationOptions
from fedsec_bench.defenses.secure_aggregation import SecureAggregation, SecureAggregationOptions
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext

CLIENTS, REPEATS = 10, 5


def best_of(fn) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def updates(size: int) -> tuple[dict, list[Message]]:
    gen = torch.Generator().manual_seed(0)
    plain = [Message.of_update(c, 10 + c, {"w": torch.randn(size, generator=gen) * 0.01}) for c in range(CLIENTS)]
    return {"w": torch.zeros(size)}, plain


def he_figures() -> dict[str, float]:
    size = 8 * 4096
    runtime = SimpleNamespace(scenario=SimpleNamespace(seed=0, tuning=SimpleNamespace(mode="lora")))
    plugin = HEAggregation(HEAggregationOptions(), runtime)
    like, plain = updates(size)

    def he_path():
        sent = [plugin.transport(ClientContext(m.client_id, 1, 0, runtime), m) for m in plain]
        ids = [m.client_id for m in plain]
        plugin.aggregation(RoundContext(1, runtime, ids, like, delivered=ids), sent)

    def raw_tenseal():
        context, slots = plugin.key_holders.context, plugin.key_holders.slots
        for start in range(0, size, slots):
            total = None
            for m in plain:
                vector = ts.ckks_vector(context, m.payload["w"][start : start + slots].double().numpy())
                total = vector if total is None else total + vector
            total.decrypt()

    he_s, raw_s = best_of(he_path), best_of(raw_tenseal)
    sent = plugin.transport(ClientContext(0, 1, 0, runtime), plain[0])
    return {"params_per_s": CLIENTS * size / he_s, "raw_params_per_s": CLIENTS * size / raw_s,
            "ratio_to_raw": raw_s / he_s, "bytes_per_param": sent.num_bytes / size}


def secagg_figures() -> dict[str, float]:
    size = 100_000
    federation = SimpleNamespace(num_clients=CLIENTS, clients_per_round=CLIENTS, sampling="uniform")
    runtime = SimpleNamespace(scenario=SimpleNamespace(seed=0, federation=federation), seed_for=lambda *keys: 0)
    plugin = SecureAggregation(SecureAggregationOptions(), runtime)
    like, plain = updates(size)
    peers = list(range(CLIENTS))
    round = RoundContext(1, runtime, peers, like, delivered=peers)

    def secure():
        sent = [plugin.transport(ClientContext(m.client_id, 1, 0, runtime, peers=peers), m) for m in plain]
        plugin.aggregation(round, sent)

    secure_s, plain_s = best_of(secure), best_of(lambda: fedavg(plain, like))
    one_client_s = best_of(lambda: plugin.transport(ClientContext(0, 1, 0, runtime, peers=peers), plain[0]))
    return {"secure_s": secure_s, "fedavg_s": plain_s, "overhead_ratio": secure_s / plain_s,
            "one_client_mask_s": one_client_s, "server_unmask_s": plugin.score_round(round, RoundTruth([]), {})["cost.secagg_unmask_s"]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, figures in (("he_aggregation", he_figures()), ("secure_aggregation", secagg_figures())):
        print(name + ": " + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
