"""What share of a federated round do the robust aggregation rules take?

The setting: 50 clients per round, each training a LoRA adapter (r = 8 on ``c_attn``) of a
GPT-2-small-sized model (12 layers, 768 wide, 12 heads, a 50257-token vocabulary, built
fresh with the harness's ``make_model``) for the harness's default 10 local steps of batch
8 × 64 tokens. One client's local round is timed with the harness's own pieces (``apply_tuning``,
``TrainableState``, ``LocalTraining``, ``make_optimizer``): a warm-up step, then ``--steps``
timed steps, whose mean is scaled to ``--local-steps``. The local executor trains the clients
one after another in one process, so a round's training time is 50 times one client's.
Evaluation, sampling and logging are left out of the round, which only makes the shares
larger than in a real run.

Each rule then aggregates 50 updates of the adapter's shape (random, so that no coordinate
ties), through its plugin's ``aggregation`` (stacking, the rule, unflattening), timed by the
median of ``--repeats`` calls after one warm-up. The goal: aggregation ≤ 5% of the round,
share = aggregation / (training + aggregation). The last column is the share had each client
taken a single local step, the least a round can train.

    .venv/bin/python benchmarks/robust_aggregation_share.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from fedsec_bench.client import LocalTraining, make_optimizer
from fedsec_bench.messages import Message, RoundContext
from fedsec_bench.models import make_model
from fedsec_bench.registry import get_plugin
from fedsec_bench.scenario import FederationConfig, LoraConfig, ModelConfig, TuningConfig
from fedsec_bench.tuning import TrainableState, apply_tuning

CLIENTS = 50
GOAL = 0.05
RULES = {  # f = 10 (a fifth of the clients), the most Bulyan admits at n = 50 is 11
    "krum": {"f": 10},
    "multikrum": {"f": 10},
    "median": {},
    "trimmed_mean": {"trim": 0.2},
    "bulyan": {"f": 10},
    "norm_bound": {},
    "centered_clip": {"iterations": 3},
    "geomedian": {"ftol": 0.0},  # all max_iter = 4 Weiszfeld updates
}


def client_seconds(steps: int, local_steps: int, vocab: int) -> tuple[float, dict]:
    """Seconds of one client's local round of ``local_steps`` steps, from ``steps`` timed ones;
    and the client's update, the shape every aggregated update takes."""
    config = ModelConfig(arch="gpt2", layers=12, hidden=768, heads=12, vocab=vocab, max_positions=1024)
    model = make_model(config, SimpleNamespace(eos_token_id=0, pad_token_id=0), seed=0)
    model = apply_tuning(model, TuningConfig(mode="lora", lora=LoraConfig(r=8, alpha=16, target_modules=["c_attn"])))
    trainable = TrainableState(model)
    ids = torch.randint(vocab, (8 * (steps + 1), 64), generator=torch.Generator().manual_seed(0))
    examples = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    federation = FederationConfig()
    global_state = trainable.snapshot()

    def train(n: int) -> float:
        trainable.load(global_state)
        optimizer = make_optimizer(list(trainable.params.values()), federation)
        loader = DataLoader(examples, batch_size=8)
        started = time.perf_counter()
        LocalTraining(model, optimizer, loader, n, torch.device("cpu")).run()
        return time.perf_counter() - started

    train(1)  # warm-up: allocator, first-call dispatch
    per_step = train(steps) / steps
    return per_step * local_steps, trainable.delta_from(global_state)


def aggregation_seconds(rule: str, options: dict, like: dict, repeats: int) -> float:
    generator = torch.Generator().manual_seed(1)
    messages = [
        Message.of_update(c, 100, {k: 1e-3 * torch.randn(t.shape, generator=generator) for k, t in like.items()})
        for c in range(CLIENTS)
    ]
    cls = get_plugin(rule, "aggregator")
    plugin = cls(cls.OptionsModel(**options), runtime=None)
    round = RoundContext(1, None, list(range(CLIENTS)), {k: torch.zeros_like(t) for k, t in like.items()},
                         delivered=list(range(CLIENTS)))
    plugin.aggregation(round, messages)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        plugin.aggregation(round, messages)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed local steps (after one warm-up step)")
    parser.add_argument("--local-steps", type=int, default=FederationConfig().local_steps,
                        help="local steps per client per round the time is scaled to (the harness default)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    started = time.perf_counter()
    client, like = client_seconds(args.steps, args.local_steps, args.vocab)
    round_seconds = CLIENTS * client
    values = sum(t.numel() for t in like.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    print(f"GPT-2-small-sized model (vocab {args.vocab}), LoRA r=8 on c_attn: {values:,} exchanged values")
    print(f"one client: {client / args.local_steps:.2f} s per local step of batch 8 x 64 (mean of {args.steps}), "
          f"x {args.local_steps} local steps = {client:.1f} s")
    print(f"round: {CLIENTS} clients train one after another (local executor): {round_seconds:.0f} s of training\n")
    one_step = round_seconds / args.local_steps
    print(f"{'rule':<14} {'options':<16} {'aggregation s':>13} {'round s':>9} {'share':>8}  ≤ {GOAL:.0%}"
          f"  {'share at 1 local step':>21}")
    for rule, options in RULES.items():
        seconds = aggregation_seconds(rule, options, like, args.repeats)
        share = seconds / (round_seconds + seconds)
        shown = ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        print(f"{rule:<14} {shown:<16} {seconds:>13.3f} {round_seconds:>9.0f} {share:>8.3%}  "
              f"{'yes' if share <= GOAL else 'NO ':<4}{seconds / (one_step + seconds):>21.3%}")
    print(f"\n(benchmark wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
