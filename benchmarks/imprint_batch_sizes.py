"""A malicious server's imprint layer against the honest server's span check, as the batch grows.

One small GPT-2 FedSGD setting (2 clients, one round, full mode, no dropout) at batch sizes
1, 4, 16 and 64: ``imprint`` (Fowl et al. 2022) reads the inputs alone in their bin, about
n (1 - 1/N)^(n-1) of n distinct inputs in N bins, whatever the batch; ``gradient_inversion``
with ``method: span_check`` (DAGER) is exact while the batch has fewer tokens than the layer
is wide and reads nothing beyond. Writes results/malicious_server_imprint.md (CPU, about a
minute):

    .venv/bin/python benchmarks/imprint_batch_sizes.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

import fedsec_bench

COMMAND = ".venv/bin/python benchmarks/imprint_batch_sizes.py"
BATCH_SIZES = (1, 4, 16, 64)


def scenario(batch_size: int, attack: dict, output_dir: str) -> dict:
    return {
        "name": f"imprint_batch_{batch_size}", "seed": 0,
        "model": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "max_positions": 64, "dropout": 0.0,
                  "tokenizer": {"kind": "bpe", "vocab_size": 512}},
        "tuning": {"mode": "full"},
        "data": {"examples_per_client": max(BATCH_SIZES), "heldout_examples": 32, "seq_len": 32,
                 "canaries": {"count": 0}},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1, "local_steps": 1,
                       "batch_size": batch_size, "optimizer": "sgd", "lr": 0.1},
        "attacks": [attack],
        "tracking": {"enabled": False, "output_dir": output_dir},
        "device": "cpu",
    }


def row(batch_size: int, output_dir: str) -> dict:
    imprint = fedsec_bench.run(scenario(batch_size, {"name": "imprint"}, output_dir)).final
    span = fedsec_bench.run(scenario(batch_size, {"name": "gradient_inversion", "method": "span_check"},
                                     output_dir)).final
    return {
        "batch": batch_size,
        "inputs n (distinct)": f"{imprint['imprint.inputs']:.0f} ({imprint['imprint.distinct_inputs']:.0f})",
        "bins N": f"{imprint['imprint.bins']:.0f}",
        "expected isolated n(1-1/N)^(n-1)": f"{imprint['imprint.isolated_bins_expected']:.1f}",
        "imprint recovered tokens": f"{imprint['imprint.recovered_tokens']:.1f}",
        "imprint token recall": f"{imprint['imprint.token_recall']:.3f}",
        "imprint token precision": f"{imprint['imprint.token_precision']:.3f}",
        "imprint ROUGE-1": f"{imprint['imprint.rouge1']:.3f}",
        "span_check token recall": f"{span['inversion.token_recall']:.3f}",
        "span_check ROUGE-1": f"{span['inversion.rouge1']:.3f}",
        "span_check rank condition": f"{span['inversion.rank_condition']:.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/malicious_server_imprint.md")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        table = pd.DataFrame([row(b, runs) for b in BATCH_SIZES])
    seconds = time.perf_counter() - started
    text = "\n".join([
        "# A malicious server's imprint layer vs the honest server's span check, by batch size",
        "",
        "Tiny GPT-2 (2 layers, width 64, MLP 256, no dropout), full mode, FedSGD (one SGD step, lr 0.1), "
        "2 clients with 64 synthetic examples each, seq_len 32, one round; figures are the mean over the two "
        "clients. `imprint`: default options (bins = MLP width, fewer where the public split's quantiles "
        "coincide). `span_check`: `gradient_inversion` with `method: span_check` on the honest model. "
        "n counts the tokens that receive a gradient, in brackets the distinct (token, position) inputs, "
        "the n of the formula.",
        "",
        table.to_markdown(index=False),
        "",
        f"Made by `{COMMAND}` in {seconds:.0f} s on CPU.",
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
