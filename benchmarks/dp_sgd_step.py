"""DP-SGD's cost on a LoRA step: private step time ÷ plain step time, same model, batch and loss (target ≤ 2).

    python benchmarks/dp_sgd_step.py

The two steps alternate (median of 7 each) so that load from other processes hits both
alike. Memory: the tensors DP-SGD holds beyond a plain step at its peak (per-example
gradients) against the plain step's gradients; a peak-allocation ratio needs CUDA and is
printed when a GPU is present.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedsec_bench.data import build_federated_data
from fedsec_bench.defenses.dp_sgd import per_example_losses
from fedsec_bench.plan import load_scenario
from fedsec_bench.runtime import build_runtime

SCENARIO = {
    "name": "dp_sgd_step",
    "model": {"arch": "gpt2", "layers": 4, "hidden": 128, "heads": 4, "max_positions": 128,
              "tokenizer": {"kind": "bpe", "vocab_size": 300}},
    "tuning": {"mode": "lora", "lora": {"r": 4, "alpha": 8}},
    "data": {"examples_per_client": 64, "seq_len": 64},
    "tracking": {"enabled": False},
}


def main() -> None:
    scenario = load_scenario(SCENARIO)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        rt = build_runtime(scenario, build_federated_data(scenario), device, Path(scratch))
    batch = rt.batcher.collate(rt.batcher.encode(rt.data.client_examples(0)[:16]))
    batch = {k: v.to(rt.device) for k, v in batch.items()}
    params = list(rt.trainable.params.values())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    wrapped = GradSampleModule(rt.model, loss_reduction="mean", strict=False)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16)
    held = {}

    def step(private):
        (wrapped.enable_hooks if private else wrapped.disable_hooks)()
        chosen = dp_optimizer if private else optimizer
        per_example_losses(rt.model, batch, "lora").mean().backward()
        if private:
            held["dp"] = sum(p.grad_sample.numel() * p.grad_sample.element_size() for p in params)
        else:
            held["plain"] = sum(p.grad.numel() * p.grad.element_size() for p in params)
        chosen.step()
        chosen.zero_grad(set_to_none=True)

    def timed(private):
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        step(private)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
            held["peak_dp" if private else "peak_plain"] = torch.cuda.max_memory_allocated()
        return time.perf_counter() - started

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(7):
        for private in (False, True):
            times[private].append(timed(private))
    plain, private = np.median(times[False]), np.median(times[True])
    wrapped.cleanup()
    print(f"device={rt.device} trainable_params={sum(p.numel() for p in params)}")
    print(f"plain_step_s={plain:.4g} private_step_s={private:.4g} step_time_ratio={private / plain:.3g} (target <= 2)")
    print(f"grad_sample_bytes={held['dp']} plain_grad_bytes={held['plain']} ratio={held['dp'] / held['plain']:.3g}")
    if "peak_dp" in held:
        print(f"peak_memory_ratio={held['peak_dp'] / held['peak_plain']:.3g}")


if __name__ == "__main__":
    main()
