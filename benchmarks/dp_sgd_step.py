"""DP-SGD's cost on a LoRA step, per clipping mode: private step time ÷ plain step time, and peak memory.

    python benchmarks/dp_sgd_step.py                 # GPT-2-small-sized: 12 layers, hidden 768, 12 heads
    python benchmarks/dp_sgd_step.py --layers 2      # the same widths, fewer blocks (a quick look on CPU)

The model is GPT-2-small-sized, built randomly by the harness (speed does not depend on the
weights): 12 layers, hidden 768, 12 heads, LoRA r 8 on c_attn, c_proj (attention and MLP) and
c_fc, a batch of 8 sequences of 128 random tokens, no padding (ghost clipping's cost grows with
the square of the sequence length, so a full-length batch is its worst case). The vocabulary is the
harness's trained BPE (1,024 tokens), not GPT-2's 50,257: the frozen output layer, common to both
steps, costs less here than in GPT-2, which makes the ratios larger (pessimistic), not smaller.

Each private step is the plugin's own (:class:`PrivateTraining`'s ``wrap`` and ``backward``):
``flat`` materialises per-example gradients (Opacus hooks); ``ghost`` computes per-example norms
and backpropagates twice. Within each mode, plain and private steps alternate (median of
``--repeats`` each) so that load from other processes hits both alike; the plain step is the same
model, batch and loss with Opacus' hooks switched off. Targets: flat ≤ 2, ghost ≤ 1.5 × plain.

Memory, per step: with CUDA, ``torch.cuda.max_memory_allocated`` (weights included). On CPU, the
rise of the process's peak resident memory over the step (Linux VmHWM, reset through
/proc/self/clear_refs before each step): activations, gradients, per-example gradients and
ghost clipping's T×T products alike. glibc would keep freed buffers resident and hide later
steps' allocations, so the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_`` fixed, which
returns every large buffer to the system when it is freed. Also printed: the bytes of
per-example gradients (``grad_sample``) the flat step holds at its peak.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedsec_bench.data import build_federated_data
from fedsec_bench.defenses.dp_sgd import Mechanism, PrivateTraining, per_example_losses, release
from fedsec_bench.plan import load_scenario
from fedsec_bench.runtime import build_runtime

MMAP_THRESHOLD = "65536"


def scenario(args) -> dict:
    return {
        "name": "dp_sgd_step",
        "model": {"arch": "gpt2", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "max_positions": args.seq, "dropout": 0.0, "tokenizer": {"kind": "bpe", "vocab_size": 1024}},
        "tuning": {"mode": "lora", "lora": {"r": args.rank, "alpha": 2 * args.rank,
                                            "target_modules": ["c_attn", "c_proj", "c_fc"]}},
        "data": {"examples_per_client": 64, "seq_len": args.seq},
        "tracking": {"enabled": False},
    }


class StepMemory:
    """Peak memory of one step: CUDA's peak allocation, or on CPU the rise of the peak resident set."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.resident = resident_kib("VmRSS")

    def peak(self) -> int:
        """Bytes: the step's peak allocation (CUDA), or how far the peak resident set rose over it (CPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return (resident_kib("VmHWM") - self.resident) * 1024


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure(training: PrivateTraining, batch: dict, repeats: int, memory: StepMemory) -> dict[str, float]:
    """Median plain and private step times under one clipping mode's wrapper, alternating, and each step's peak."""
    params = [p for group in training.optimizer.param_groups for p in group["params"]]
    wrapped, dp_optimizer = training.wrap()
    figures = {"grad_sample_bytes": 0}

    def step(private: bool) -> None:
        (wrapped.enable_hooks if private else wrapped.disable_hooks)()
        if private:
            training.backward(wrapped, dp_optimizer, batch)
            held = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
            figures["grad_sample_bytes"] = sum(g.numel() * g.element_size() for g in held)
        else:
            per_example_losses(training.model, batch, training.tuning_mode).mean().backward()
        chosen = dp_optimizer if private else training.optimizer
        chosen.step()
        chosen.zero_grad(set_to_none=True)

    def timed(private: bool) -> tuple[float, int]:
        memory.start()
        started = time.perf_counter()
        step(private)
        peak = memory.peak()  # synchronises CUDA before the clock stops
        return time.perf_counter() - started, peak

    try:
        step(False), step(True)  # warm-up
        runs = {False: [], True: []}
        for _ in range(repeats):
            for private in (False, True):
                runs[private].append(timed(private))
    finally:
        wrapped.cleanup()
        release(training.model, params)
    (plain_s, plain_peak), (private_s, private_peak) = (np.median(np.array(runs[p]), axis=0) for p in (False, True))
    return figures | {"plain_s": plain_s, "private_s": private_s,
                      "plain_peak": plain_peak, "private_peak": private_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    loaded = load_scenario(scenario(args))
    with tempfile.TemporaryDirectory() as scratch:
        rt = build_runtime(loaded, build_federated_data(loaded), device, Path(scratch))
    ids = torch.randint(len(rt.tokenizer), (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {k: v.to(device) for k, v in batch.items()}
    params = list(rt.trainable.params.values())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    print(f"device={device} layers={args.layers} hidden={args.hidden} heads={args.heads} seq={args.seq} "
          f"batch={args.batch} lora_r={args.rank} trainable_params={sum(p.numel() for p in params)}")
    memory = StepMemory(device)
    what = "peak_allocated_bytes" if device.type == "cuda" else "peak_rss_rise_bytes"
    for clipping, target in (("flat", 2.0), ("ghost", 1.5)):
        training = PrivateTraining(
            model=rt.model, optimizer=optimizer, loader=None, steps=1, device=device, tuning_mode="lora",
            mechanism=Mechanism(args.batch, 1.0, 1.0), max_grad_norm=1.0, clipping=clipping,
        )
        rt.model.train()
        f = measure(training, batch, args.repeats, memory)
        print(f"{clipping}: plain_step_s={f['plain_s']:.4g} private_step_s={f['private_s']:.4g} "
              f"step_time_ratio={f['private_s'] / f['plain_s']:.3g} (target <= {target})")
        print(f"{clipping}: {what} plain={f['plain_peak']:.4g} private={f['private_peak']:.4g} "
              f"ratio={f['private_peak'] / f['plain_peak']:.3g} grad_sample_bytes={f['grad_sample_bytes']}")


if __name__ == "__main__":
    main()
