"""``dp_ftrl``: user-level differential privacy without sampling (Kairouz et al. 2021, DP-FTRL).

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling" (ICML), in its federated form, as Gboard trains
with it (McMahan & Thakurta 2022). The privacy unit is a user (a client, all its data).

Algorithm. Each participant clips its update Δ_k to L2 norm S on the client (as
``dp_fedavg``). Leaf t of a binary tree over the rounds is round t's clipped sum
x_t = Σ_k clip(Δ_k); every node of the tree (the sum of the leaves under it) carries its
own Gaussian noise N(0, (z·S)²) (tree aggregation: Dwork, Naor, Pitassi, Rothblum 2010;
Chan, Shi, Song 2011). At round t the server releases the noisy prefix sum Ŝ_t, the sum
of the O(log t) noisy nodes whose intervals partition [1, t] (one per set bit of t), and
the model is follow-the-regularized-leader's θ_t = θ_0 + server_lr · Ŝ_t / n̄, n̄ the
fixed expected number of participants (``clients_per_round``: the denominator must not
depend on the data). The round loop steps the model by the aggregate (θ ← θ + server_lr
· aggregate, additive: :meth:`~fedsec_bench.tuning.TrainableState.step`), so
``post_aggregation`` returns (Ŝ_t − Ŝ_{t−1}) / n̄ = (x_t + the noise of the nodes that
entered the cover − the noise of those that left it) / n̄. Each node's noise is drawn
from its own seed, so the server keeps only the O(log t) node names of the cover and
draws a node's noise again when it leaves; no leaf and no tensor is kept across rounds.

Variants from the paper:

* ``restart_every: R``: a new tree every R rounds, its prefix starting again from the
  current model (the paper restarts every epoch); the trees' noises are independent.
* ``tree_completion``: at a tree's last round (the R-th, or the run's last) the tree is
  padded with zero leaves to the next power of two and the model takes the padded tree's
  root, one node's noise instead of one per set bit of the round (the paper's appendix;
  its code's ``proceed_until``). The root is one more released node, in the accounting.
  Honaker's (2015) efficient estimator, which averages every node's estimate of a prefix
  for less variance, is not implemented.

Accounting. DP-FTRL needs no sampling assumption: the client schedule is public and fixed
in advance (uniform or poisson, :func:`fedsec_bench.federation.sample_clients` from the
round's seed), and no amplification is claimed. Everything released is post-processing
of the vector of released noisy nodes (a node is released once complete, plus a
completed tree's root), a Gaussian mechanism with noise z·S per node. A user who takes
part c_v times under node v moves that node's sum by at most c_v·S, so its L2
sensitivity² is S²·Σ_v c_v² over all trees and nodes; the guarantee for every user is
the Gaussian mechanism's with multiplier z/√max_u Σ_v c_v² (RDP α·Σc²/(2z²)), converted
to (ε, δ) by dp-accounting's RDP accountant. With each user at most once per tree this
is the paper's bound: Σ over trees of ceil(log2(T+1)) (dp-accounting's
SingleEpochTreeAggregationDpEvent). Neighbouring runs replace a user's updates by zeros
(the paper's Definition 1.1; add/remove with a fixed denominator). Models chosen from
earlier releases feed later leaves; as in the paper (and Denisov et al. 2022 for linear
mechanisms on adaptive streams) the adaptive release is as private as this one.

A sampled client whose message is lost (a dropout) is counted as if it had taken part:
the worst case, and the server cannot tell a lost update from a zero one.

Transport: ``num_examples = 1`` on every message, so FedAvg's weighted mean is the plain
mean of the n delivered updates and ``post_aggregation`` recovers their sum (· n), as in
``dp_fedavg``: the steps every user-level mechanism on FedAvg shares (:mod:`.user_level`,
with what they rely on).

Figures: ``privacy.user_epsilon`` (lower is better) at ``privacy.user_delta``;
``dp_ftrl.clipped_fraction``, the share of delivered updates the clip shortened (high:
S cuts the signal; near 0: S is loose and the noise larger than it needs to be);
``dp_ftrl.tree_depth``, the released nodes above the current tree's first leaf (its
sensitivity² per tree for a user seen once); ``dp_ftrl.max_participations``, the most
times one user took part in one tree so far (1 is the paper's setting; more raises ε).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import dp_accounting
import torch
from pydantic import Field

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, RoundContext, State
from fedsec_bench.plugins import Options
from fedsec_bench.updates import gaussian_noise

from .user_level import UserLevelDP, clip_update, clipped_fraction, clipped_sum, over_expected_clients, user_delta

UNCLIPPED = "dp_ftrl.unclipped"
"""1[‖Δ_k‖ ≤ S], recorded on the client for the clipped-fraction figure (never sent)."""
NOISE_STREAM = 3
"""Last key of a node's noise seed, after (tree, level, index)."""


class DPFTRLOptions(Options):
    clip_norm: float = Field(1.0, gt=0, description="S: L2 bound on each user's update.")
    noise_multiplier: float = Field(1.0, ge=0, description="z: noise std of each tree node / S. 0 = clipping only (ε = ∞).")
    delta: float | None = Field(None, gt=0, lt=1, description="δ of the user-level guarantee; default 1/(2·num_clients).")
    restart_every: int | None = Field(
        None, ge=1, description="Rounds per tree: a new tree, from the current model, every R rounds. None: one tree."
    )
    tree_completion: bool = Field(
        False, description="At each tree's last round, pad it to a power of two and take the root (one node's noise)."
    )


@dataclass(frozen=True)
class Node:
    """A node of tree ``tree``: the sum of its leaves index·2^level + 1 … (index + 1)·2^level."""

    tree: int
    level: int
    index: int


@dataclass(frozen=True)
class Trees:
    """Which tree, and which leaf of it, each round is; and the nodes a round's prefix sum takes."""

    rounds: int
    restart_every: int | None
    tree_completion: bool

    def position(self, rnd: int) -> tuple[int, int]:
        """(tree, leaf) of round ``rnd``, both counted from 0 and 1."""
        per_tree = self.restart_every or self.rounds
        return (rnd - 1) // per_tree, (rnd - 1) % per_tree + 1

    def is_last_leaf(self, rnd: int) -> bool:
        return rnd == self.rounds or self.position(rnd)[1] == self.restart_every

    def completes(self, rnd: int) -> bool:
        """Whether round ``rnd`` releases its padded tree's root instead of the usual cover."""
        return self.tree_completion and self.is_last_leaf(rnd)

    def cover(self, rnd: int) -> list[Node]:
        """The noisy nodes whose sum is the prefix sum released at round ``rnd``: one per set bit of
        the leaf, or the padded tree's root when the tree is completed."""
        tree, leaf = self.position(rnd)
        if self.completes(rnd):
            return [Node(tree, padded_root_level(leaf), 0)]
        nodes, start = [], 0
        for level in reversed(range(leaf.bit_length())):
            if leaf >> level & 1:
                nodes.append(Node(tree, level, start >> level))
                start += 1 << level
        return nodes

    def depth(self, rnd: int) -> int:
        """Released nodes above the first leaf of ``rnd``'s tree by then: ceil(log2(leaf + 1)), one more
        if completion adds a root (with each user at most once per tree, its sensitivity² per tree)."""
        leaf = self.position(rnd)[1]
        return leaf.bit_length() + int(self.completes(rnd) and not is_power_of_two(leaf))


def padded_root_level(leaves: int) -> int:
    """ceil(log2 leaves): the root's level once the tree is padded to a power of two."""
    return (leaves - 1).bit_length()


def is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


class TreeAccountant:
    """Per user, Σ over the released nodes of (its participations under the node)², round by round.

    A binary counter over the current tree: ``pending[level]`` holds the participation counts
    of the complete node at that level that still waits for its right sibling (the cover of
    the leaves so far), so only O(log T) counts are kept. Each node is released, and counted,
    when its last leaf arrives; a completed tree's root when the tree ends.
    """

    def __init__(self, trees: Trees):
        self.trees = trees
        self.sensitivity2: Counter[int] = Counter()
        self.max_sensitivity2 = 0
        self.max_participations = 0
        self.tree = -1
        self.pending: list[Counter[int] | None] = []
        self.in_tree: Counter[int] = Counter()

    def record(self, rnd: int, participants: list[int]) -> None:
        """Round ``rnd``'s leaf, with these users under it (each at most once)."""
        tree, leaf = self.trees.position(rnd)
        if tree != self.tree:
            self.tree, self.pending, self.in_tree = tree, [], Counter()
        self.in_tree.update(participants)
        self.max_participations = max([self.max_participations, *(self.in_tree[u] for u in participants)])
        self.add_leaf(Counter(participants))
        if self.trees.completes(rnd) and not is_power_of_two(leaf):  # a power of two's root is complete already
            self.release(sum((c for c in self.pending if c is not None), Counter()))

    def add_leaf(self, node: Counter[int]) -> None:
        """Release the leaf and every node it completes (merging it with the waiting left siblings)."""
        level = 0
        self.release(node)
        while level < len(self.pending) and self.pending[level] is not None:
            node = self.pending[level] + node
            self.pending[level] = None
            self.release(node)
            level += 1
        if level == len(self.pending):
            self.pending.append(None)
        self.pending[level] = node

    def release(self, node: Counter[int]) -> None:
        for user, count in node.items():
            self.sensitivity2[user] += count * count
            self.max_sensitivity2 = max(self.max_sensitivity2, self.sensitivity2[user])


def gaussian_epsilon(noise_multiplier: float, sensitivity2: float, delta: float) -> float:
    """ε(δ) of one Gaussian mechanism of noise std z and L2 sensitivity √sensitivity2 (units of S),
    by dp-accounting's RDP accountant: 0 if nothing was released, ∞ without noise."""
    if sensitivity2 == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(sensitivity2))
    return float(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def schedule_accountant(schedule: list[list[int]], restart_every: int | None = None,
                        tree_completion: bool = False, rounds: int | None = None) -> TreeAccountant:
    """The accountant after every round of a client schedule (round 1 first) of a run of ``rounds``
    rounds (default: the schedule's length)."""
    accountant = TreeAccountant(Trees(rounds or len(schedule), restart_every, tree_completion))
    for rnd, participants in enumerate(schedule, start=1):
        accountant.record(rnd, participants)
    return accountant


class DPFTRL(UserLevelDP):
    name = "dp_ftrl"
    summary = "user-level DP-FTRL: clipped updates, tree-aggregated noise on prefix sums, no sampling (Kairouz et al. 2021)"
    OptionsModel = DPFTRLOptions

    def __init__(self, options: DPFTRLOptions, runtime):
        super().__init__(options, runtime)
        fed = runtime.scenario.federation
        self.expected_clients = fed.clients_per_round  # n̄, fixed: the denominator must not depend on the data
        self.delta = user_delta(options.delta, fed.num_clients)
        self.trees = Trees(fed.rounds, options.restart_every, options.tree_completion)
        self.accountant = TreeAccountant(self.trees)
        self.cover: list[Node] = []  # the nodes of the prefix sum the model holds

    @classmethod
    def check(cls, options: DPFTRLOptions, scenario) -> None:
        rounds = scenario.federation.rounds
        if options.restart_every is not None and options.restart_every > rounds:
            raise ValueError(
                f"restart_every ({options.restart_every}) exceeds federation.rounds ({rounds}): the tree would never "
                "restart; lower it or leave it unset (one tree)"
            )

    # --- client side --------------------------------------------------------------
    def client_update(self, client: ClientContext, update: State) -> State:
        return clip_update(client, update, self.options.clip_norm, UNCLIPPED)

    # --- server side --------------------------------------------------------------
    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """(Ŝ_t − Ŝ_{t−1}) / n̄: this round's clipped sum plus the noise of the nodes that entered the
        cover, minus those that left it (a new tree's first round starts from the model as it is)."""
        step = clipped_sum(aggregate, round)
        tree, _ = self.trees.position(round.round)
        before = [node for node in self.cover if node.tree == tree]
        self.cover = self.trees.cover(round.round)
        for node in self.cover:
            if node not in before:
                step = self.with_noise(step, node, sign=1.0)
        for node in before:
            if node not in self.cover:
                step = self.with_noise(step, node, sign=-1.0)
        self.accountant.record(round.round, round.sampled)  # dropouts count as participants: the worst case
        return over_expected_clients(step, self.expected_clients)

    def with_noise(self, state: State, node: Node, sign: float) -> State:
        """``state`` ± the node's noise N(0, (z·S)²), the same every time it is drawn (its own seed)."""
        seed = self.runtime.seed_for(node.tree, node.level, node.index, NOISE_STREAM)
        generator = torch.Generator().manual_seed(seed)
        noise = gaussian_noise(state, self.options.noise_multiplier * self.options.clip_norm, generator)
        return {name: t + sign * noise[name] for name, t in state.items()}

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        """The guarantee so far, the tree's shape, and the share of the delivered updates clipped."""
        return {
            "dp_ftrl.clipped_fraction": clipped_fraction(round, truth, UNCLIPPED),
            "dp_ftrl.tree_depth": float(self.trees.depth(round.round)),
            "dp_ftrl.max_participations": float(self.accountant.max_participations),
            "privacy.user_epsilon": gaussian_epsilon(self.options.noise_multiplier, self.accountant.max_sensitivity2,
                                                     self.delta),
            "privacy.user_delta": self.delta,
        }
