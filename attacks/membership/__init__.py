"""``membership_inference``: was this example in the training data? Attacks on the final model or one client's update.

Threat models (option ``threat``):

- ``external``: black-box access to the final global model's per-token log-probs
  (``training_end``). Members are the training examples of clients that took part in
  at least one round; non-members are held-out examples of the same distribution.
- ``server``: the honest-but-curious server in round ``attack_round``. From the
  target client's plain message it rebuilds the client's local model (global + update)
  and attacks that client's examples. When the payload is not plain tensors (encrypted or
  masked aggregation) or the target sent nothing, it only has what it really holds: the
  model after aggregation; ``mia.server.update_readable`` says which. A malicious server that
  isolated the target's update from the aggregate (``model_inconsistency``) reads it as plain.

Either way the attack is scored outside the protocol (``score_round``, ``training_end``):
which examples were members is the simulator's truth (who trained, and on what), not
something the attacker is given.

Methods (option ``method``, one name or a list): ``loss``, ``zlib``, ``min_k``,
``reference``, ``lira``, ``lira_offline``, ``rmia``, ``rmia_offline``; see
:mod:`.scores` for each definition and :mod:`.shadow` for the reference/shadow models.

On prompt/response data every score is taken on the tokens training took its loss on:
the response given its prompt (the prompt too with ``data.train_on_prompt``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from fedsec_bench.data import Example
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin

from . import scores as S
from .audit import eps_lower_bound
from .canaries import format_space, fresh_canaries
from .roc import auc, plot_roc, roc_curve, tpr_at_fpr
from .shadow import reference_logprobs, shadow_statistics, using_state

Method = Literal["loss", "zlib", "min_k", "reference", "lira", "lira_offline", "rmia", "rmia_offline"]
SHADOW_METHODS = {"lira", "lira_offline", "rmia", "rmia_offline"}
POPULATION_METHODS = {"reference", "rmia", "rmia_offline"}
"""Methods that need population data beyond the targets: the held-out split is then halved."""
SEED_KEY = 7007  # keeps this attack's random draws apart from the federation's


class MembershipOptions(Options):
    method: list[Method] = Field(
        ["loss"], min_length=1, description="One method or a list (all scored on the same samples)."
    )
    threat: Literal["external", "server"] = "external"
    num_samples: int | None = Field(
        None, ge=2, description="Ordinary member examples, and as many non-members; default: as many as the data allow."
    )
    canaries: bool = Field(
        False, description="Also attack the target clients' planted canaries, against as many fresh ones (non-members)."
    )
    min_k: float = Field(0.2, gt=0, le=1, description="min_k: fraction of lowest-probability tokens averaged.")
    num_shadows: int = Field(
        4, ge=4, description="lira/rmia: shadow models, each on a random half of the targets (≥ 4: two per side)."
    )
    gamma: float = Field(1.0, gt=0, description="rmia: likelihood-ratio threshold γ.")
    delta: float = Field(1e-5, ge=0, lt=1, description="δ of the (ε, δ) audit; use the DP defense's δ.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Clopper–Pearson confidence of the audit.")
    target_client: int | None = Field(None, ge=0, description="server: client attacked (default: first sampled).")
    attack_round: int | None = Field(None, ge=1, description="server: round attacked (default: the last).")

    @field_validator("method", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class MembershipInference(Plugin):
    name = "membership_inference"
    kind = "attack"
    summary = "membership inference (loss, zlib, min_k, reference, LiRA, RMIA) with ROC figures and an ε audit"
    on_instruction_data = "scores the tokens the loss is on (the response given its prompt); zlib on those words"
    OptionsModel = MembershipOptions
    exclusive_by = "threat"  # one entry per threat: list the methods in it (method: [loss, lira, ...])

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.initial = runtime.trainable.snapshot()  # shadows start where the federation started
        self.participants: set[int] = set()
        self.observed: tuple[int, State | None] | None = None
        fed = runtime.scenario.federation
        self.attack_round = options.attack_round or fed.rounds
        self.prefix = "mia." if options.threat == "external" else "mia.server."

    @classmethod
    def check(cls, options: MembershipOptions, scenario) -> None:
        fed = scenario.federation
        if options.threat == "external" and (options.target_client is not None or options.attack_round is not None):
            raise ValueError("target_client and attack_round apply to threat: server only; remove them")
        if options.attack_round is not None and options.attack_round > fed.rounds:
            raise ValueError(f"attack_round ({options.attack_round}) is after the last round ({fed.rounds})")
        if options.target_client is not None and options.target_client >= fed.num_clients:
            raise ValueError(f"target_client ({options.target_client}) is not a client id (0..{fed.num_clients - 1})")
        if POPULATION_METHODS & set(options.method) and scenario.data.heldout_examples < 4:
            raise ValueError(
                "reference/rmia need data.heldout_examples ≥ 4 (half are the attacker's population data)"
            )
        if options.canaries and any(format_space(c.format).size < 2 for c in scenario.data.canaries.custom):
            raise ValueError("canaries: a custom canary whose format has no '#' or '@' has no other secret to "
                             "draw a non-member from; give its format a slot, or set canaries: false")

    # --- hooks -------------------------------------------------------------------------
    def server_observation(self, round: RoundContext, messages: list[Message]) -> None:
        if self.options.threat != "server" or round.round != self.attack_round:
            return
        target = self.options.target_client
        if target is None:
            target = round.sampled[0] if round.sampled else 0
        sent = [m for m in messages if m.client_id == target]
        readable = sent[0].payload if sent and sent[0].is_plain else None
        self.observed = (target, readable)

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """A malicious server that isolated the target's update from the aggregate reads it as a plain one."""
        if self.observed is not None and self.observed[1] is None and self.observed[0] in round.isolated:
            self.observed = (self.observed[0], round.isolated[self.observed[0]])
        return aggregate

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float] | None:
        self.participants.update(truth.trained())
        if self.observed is None or round.round != self.attack_round:
            return None
        target, update = self.observed
        if update is None:  # only the aggregate: the model the round produced
            model = self.runtime.trainable.snapshot()
        else:
            sent = round.sent_to(target)  # a malicious server may have sent the target another state
            model = {n: sent[n] + update[n].to(sent[n].dtype) for n in sent}
        figures = self.attack(model, [target], round.round)
        return {**figures, f"{self.prefix}update_readable": float(update is not None)}

    def training_end(self, runtime) -> dict[str, float] | None:
        if self.options.threat != "external":
            return None
        return self.attack(runtime.trainable.snapshot(), sorted(self.participants), 0)

    # --- the attack ----------------------------------------------------------------------
    def attack(self, target: State, clients: list[int], key: int) -> dict[str, float]:
        rt, opts = self.runtime, self.options
        rng = np.random.default_rng(rt.seed_for(SEED_KEY, key))
        wants_population = bool(POPULATION_METHODS & set(opts.method))
        members, nonmembers, population = draw_samples(
            rt, clients, rng, opts.num_samples, opts.canaries, wants_population, self.prefix
        )
        targets = members + nonmembers
        labels = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
        universe = targets + population
        texts = S.scored_texts(rt, universe)

        seconds: dict[str, float] = {}
        with timed(seconds, "target"), using_state(rt, target):
            target_lp = S.token_logprobs(rt, universe)
        models: dict = {}
        if "reference" in opts.method:
            with timed(seconds, "reference model"):
                seed = int(rng.integers(2**31))
                models["reference"] = reference_logprobs(rt, self.initial, population, universe, seed)
        if SHADOW_METHODS & set(opts.method):
            with timed(seconds, "shadow models"):
                models["shadows"] = shadow_statistics(rt, self.initial, targets, universe, opts.num_shadows, rng)
        results, cost = {}, {}
        for method in opts.method:
            with timed(seconds, method):
                results[method] = score(method, target_lp, texts, len(targets), models, opts)
            cost[method] = sum(seconds.get(part, 0.0) for part in ("target", method, *needs(method)))
        figures = self.figures(results, labels, cost)
        self.write_artifacts(results, labels, targets, figures)
        return figures

    def figures(self, results: dict[str, np.ndarray], labels: np.ndarray, seconds: dict[str, float]) -> dict:
        """Per-method figures, then each headline figure as the strongest method's.

        With several methods, each audit uses confidence 1 − (1 − c)/m (Bonferroni), so
        the maximum over methods keeps the stated confidence.
        """
        opts, p = self.options, self.prefix
        confidence = 1 - (1 - opts.confidence) / len(results)
        out: dict[str, float] = {f"{p}num_samples": float(labels.sum())}
        headline: dict[str, list[float]] = {}
        for method, s in results.items():
            row = {
                "auc": auc(s, labels),
                "tpr_at_1pct_fpr": tpr_at_fpr(s, labels, 0.01),
                "tpr_at_0_1pct_fpr": tpr_at_fpr(s, labels, 0.001),
                "eps_lower_bound": eps_lower_bound(s, labels, opts.delta, confidence),
            }
            for name, value in row.items():
                headline.setdefault(name, []).append(value)
                out[f"{p}{method}.{name}"] = value
            out[f"{p}{method}.seconds"] = seconds[method]
        out |= {f"{p}{name}": max(values) for name, values in headline.items()}
        return out

    def write_artifacts(self, results, labels, targets, figures) -> None:
        stem = self.prefix.rstrip(".").replace(".", "_")
        texts = [self.runtime.batcher.renderer.full_text(e) for e in targets]  # as the model read it
        table = pd.DataFrame({"text": texts, "member": labels.astype(int), **results})
        self.runtime.write_table(f"{stem}_scores.csv", table.rename_axis("sample").reset_index())
        curves = {
            f"{m} (AUC {figures[f'{self.prefix}{m}.auc']:.2f})": roc_curve(s, labels)[:2] for m, s in results.items()
        }
        title = f"{stem}: {int(labels.sum())} members, as many non-members"
        plot_roc(curves, self.runtime.artifact_dir / f"{stem}_roc.png", title)


def draw_samples(
    runtime,
    clients: list[int],
    rng: np.random.Generator,
    num_samples: int | None = None,
    canaries: bool = False,
    wants_population: bool = False,
    prefix: str = "mia.",
) -> tuple[list[Example], list[Example], list[Example]]:
    """(members, non-members, attacker population), each drawn from the same distribution.

    Members: ``num_samples`` (default: all) distinct ordinary examples of ``clients`` and, with
    ``canaries``, their planted canaries (repetitions 0 is a secret inside another
    record, not a record of its own: not attacked). Non-members: as many held-out
    examples and as many fresh canaries (:func:`.canaries.fresh_canaries`: canaries
    that could have been planted but were not). The population, used by reference
    and rmia only (``wants_population``: non-members then come from half the held-out
    split at most), is the rest of the held-out split and as many fresh canaries again.
    ``prefix`` names the attack in errors.
    """
    data = runtime.data
    ordinary = list(dict.fromkeys(data.pool[i] for c in clients for i in data.parts[c]))
    planted = [c for c in data.canaries if c.client_id in clients and c.repetitions] if canaries else []
    heldout = [data.heldout[i] for i in rng.permutation(len(data.heldout))]
    available = len(heldout) // 2 if wants_population else len(heldout)
    n = min(len(ordinary), available, num_samples or len(ordinary))
    if n < 1:
        raise RuntimeError(f"{prefix}: no member examples to attack (did any client train?)")
    fresh, spare = fresh_canaries(planted, 2, rng, runtime.scenario.data.is_prompted)
    members = [ordinary[i] for i in rng.choice(len(ordinary), n, replace=False)] + [c.example for c in planted]
    nonmembers = heldout[:n] + [c.example for c in fresh]
    population = heldout[n:] + [c.example for c in spare] if wants_population else []
    return members, nonmembers, population


def needs(method: str) -> list[str]:
    """The shared computations a method's running time includes."""
    return ["shadow models"] if method in SHADOW_METHODS else ["reference model"] if method == "reference" else []


def score(method: str, target_lp, texts: list[str], num_targets: int, models: dict, opts) -> np.ndarray:
    """One method's member scores for the targets, the first ``num_targets`` of the scored universe.

    ``texts`` are the universe's scored words (:func:`.scores.scored_texts`), what zlib compresses."""
    t = slice(0, num_targets)
    if method == "loss":
        return S.loss_score(target_lp[t])
    if method == "zlib":
        return S.zlib_score(target_lp[t], texts[t])
    if method == "min_k":
        return S.min_k_score(target_lp[t], opts.min_k)
    if method == "reference":
        return S.reference_score(target_lp[t], models["reference"][t])
    mean, total, keep = models["shadows"]
    if method.startswith("lira"):
        return S.lira_score(S.mean_logprob(target_lp)[t], mean[:, t], keep, online=method == "lira")
    # population examples z were in no shadow's training set: all reference models serve for Pr(z)
    use_x = np.ones_like(keep) if method == "rmia" else ~keep
    z = slice(num_targets, len(texts))
    own = S.total_logprob(target_lp)
    use_z = np.ones((keep.shape[0], len(texts) - num_targets), dtype=bool)
    return S.rmia_score(own[t], total[:, t], use_x, own[z], total[:, z], use_z, opts.gamma)


@contextmanager
def timed(seconds: dict[str, float], part: str):
    """Add the block's wall-clock time to ``seconds[part]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started
