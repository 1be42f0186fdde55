"""Attacks and defenses as plugins, found by name, called at the round's hook points.

A plugin is a subclass of :class:`Plugin` that overrides the hooks it needs and declares
what it sends and needs (the capability attributes below); :mod:`fedsec_bench.plan` checks
every combination against those declarations, so no plugin names another. Plugins are
registered through the ``fedsec_bench.plugins`` entry-point group (:mod:`fedsec_bench.registry`),
the built-in ones included, so a third party ships an attack or defense in its own package.

Hook order within a hook point: attacks first, then defenses, each in scenario order,
then the aggregation rule (``federation.aggregator``, FedAvg by default). That is the
threat model's order on the client (a malicious client poisons its data or update
before the client-side defense clips or encrypts it), lets server-side observers see
the output of every transport defense, and lets a defense that changes what is sent
(encryption, masking) aggregate it before the plain-tensor rule is reached.

Who sees what: client-side hooks see their own client; the server-side hooks (dispatch,
collusion, server_observation, aggregation, post_aggregation) see a :class:`RoundContext` and
the messages the transport delivered, nothing more. The simulator's ground truth (a
:class:`~fedsec_bench.ground_truth.RoundTruth`: every client's report, who attacked, the
plaintexts under encryption) goes only to the scorer, ``score_round``, which runs outside
the protocol; ``training_end`` scores the final model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from .messages import ClientContext, Message, RoundContext, State

if TYPE_CHECKING:
    import torch

    from .client import LocalTraining
    from .data import Example, FederatedData
    from .ground_truth import RoundTruth
    from .runtime import Runtime
    from .scenario import Scenario

MODES = frozenset({"full", "lora", "prompt"})

HOOKS = (
    "dispatch",
    "client_data",
    "local_training",
    "client_update",
    "transport",
    "collusion",
    "server_observation",
    "aggregation",
    "post_aggregation",
    "score_round",
    "training_end",
)
CLIENT_HOOKS = HOOKS[1:5]
"""Hooks that run where the client trains: in this process (executor: local) or on a Ray worker."""


class Options(BaseModel):
    """Base for a plugin's options; unknown keys are errors like everywhere else."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """An attack, defense or aggregation rule. Override any hooks; the defaults pass data through."""

    name: ClassVar[str]
    kind: ClassVar[Literal["attack", "defense", "aggregator"]]
    summary: ClassVar[str] = ""
    on_instruction_data: ClassVar[str] = ""
    """What the plugin does with prompt/response records (data.format instruction or chat), in one
    line, shown by ``fedsec list``; every built-in plugin says it."""
    modes: ClassVar[frozenset[str]] = MODES
    OptionsModel: ClassVar[type[Options]] = Options

    # --- declared capabilities, held against each other by fedsec_bench.plan at load time
    sends_plain: ClassVar[bool] = True
    """False when ``transport`` replaces the plain update (ciphertexts, masked vectors): the server can
    then only compute a sum, and a plugin listed after it sees no plain message."""
    needs_plain_updates: ClassVar[bool] = False
    """True when the server side needs each client's plain update (distances, coordinate-wise order)."""
    aggregates_mean: ClassVar[bool] = False
    """True when ``aggregation`` returns the ``num_examples``-weighted mean of the updates."""
    needs_mean_aggregate: ClassVar[bool] = False
    """True when this plugin relies on the round's aggregate being that weighted mean."""
    moves_model_outside_aggregate: ClassVar[bool] = False
    """True when the server changes the global model by more than the aggregate (FedEx-LoRA folds a
    residual computed from each client's own update into the frozen weights)."""
    needs_model_from_aggregate_only: ClassVar[bool] = False
    """True when this plugin's guarantee covers only what the aggregate carries (DP-FedAvg's noised mean)."""
    isolates_updates: ClassVar[bool] = False
    """True when ``post_aggregation`` recovers single clients' updates from the aggregate into
    :attr:`RoundContext.isolated` (a malicious server's model inconsistency); plugins whose
    ``post_aggregation`` reads them must be listed after it."""
    needs_peer_digests: ClassVar[bool] = False
    """True when a client-side hook reads :attr:`ClientContext.peer_digests` (the digests of the models
    the round's clients received, announced among them); the round loop computes them only then."""
    exclusive_by: ClassVar[str | None] = None
    """An option whose value two entries of this plugin may not share (they would log the same figures)."""

    def __init__(self, options: Options, runtime: Runtime):
        self.options = options
        self.runtime = runtime

    @classmethod
    def check(cls, options: Options, scenario: Scenario) -> None:
        """Refuse, at load time, options that cannot work with this scenario (raise ValueError with the
        reason). What concerns another plugin is declared in the capability attributes instead."""

    @classmethod
    def check_data(cls, options: Options, scenario: Scenario, data: FederatedData) -> None:
        """Refuse, before the run starts, options the built data cannot satisfy (each client's real number
        of examples, say); raise ValueError with the reason."""

    @classmethod
    def check_model(cls, options: Options, scenario: Scenario, model: torch.nn.Module) -> None:
        """Refuse, before the run starts, options the model as loaded and tuned cannot satisfy (what only a
        loaded checkpoint tells, such as tied weights); raise ValueError with the reason."""

    def __getstate__(self) -> dict:
        """Pickled without the runtime: under executor ray, a worker's copy of the plugin runs the
        client-side hooks with the worker's own runtime (see :mod:`fedsec_bench.ray_executor`).
        A plugin holding something unpicklable overrides this and ``__setstate__``."""
        return {k: v for k, v in self.__dict__.items() if k != "runtime"}

    # --- resuming a run --------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The state this plugin carries from round to round, for a resumed run to go on exactly as
        an uninterrupted one; saved with ``torch.save`` after a round.

        Default: every attribute but the runtime and the options, which the resumed run builds
        again. A plugin overrides this when an attribute cannot be pickled (a TenSEAL context),
        points into the runtime (a model's weights), or when it changed state outside itself
        that the core's checkpoint (the trainable parameters) does not hold.
        """
        return {k: v for k, v in self.__dict__.items() if k not in ("runtime", "options")}

    def restore(self, state: dict) -> None:
        """Take back what :meth:`checkpoint` returned, on a fresh instance built for the same scenario."""
        self.__dict__.update(state)

    # --- server side, before training ----------------------------------------------
    def dispatch(self, round: RoundContext, client_id: int, state: State) -> State:
        """What the server sends one sampled client: an honest server sends every client the global
        state; a malicious one may send each a crafted state (same names and shapes). ``state`` is
        what the plugins before this one made of it. Clients cannot tell unless a defense checks
        (``peer_digests``). Must not modify ``state`` in place: return a new dict."""
        return state

    # --- client side -------------------------------------------------------------
    def client_data(self, client: ClientContext, examples: list[Example]) -> list[Example]:
        """Rewrite what a client trains on (a poisoning client's records); examples, not token ids, so it
        works in every data format and with every tokenizer."""
        return examples

    def local_training(self, client: ClientContext, training: LocalTraining) -> LocalTraining:
        return training

    def client_update(self, client: ClientContext, update: State) -> State:
        return update

    def transport(self, client: ClientContext, message: Message) -> Message | None:
        """Replace what goes on the wire; None means the message is lost (the client dropped out)."""
        return message

    # --- between the clients and the server ------------------------------------
    def collusion(self, round: RoundContext, messages: list[Message]) -> list[Message]:
        """Colluding malicious clients rewrite their own messages, knowing every message of the round.

        This is the simulation's omniscience assumption (ALIE, IPM need the benign
        updates): it runs after all clients trained and before the server receives.
        A plugin must only replace messages of clients it controls.
        """
        return messages

    # --- server side -------------------------------------------------------------
    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float] | None:
        """Observe exactly what the server received. Return figures to log, or None."""

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State | None:
        """Return the aggregate update to replace FedAvg, or None to leave it to the next plugin."""

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        return aggregate

    # --- outside the protocol ---------------------------------------------------------
    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float] | None:
        """The scorer: figures to log for this round, given the round's metrics so far; runs after the
        server's step and the evaluation.

        It runs outside the protocol and is the only hook that sees the simulator's ground
        truth (``truth``: every client's report, who attacked, the notes client-side hooks
        left), so a figure measured against what no party knows is computed here. Figures
        only: it must not change the model, nor anything the plugin's protocol hooks act on
        in later rounds (a defense fed from the truth would be an oracle). Figures a
        protocol hook computed from what it saw are returned here too.
        """

    def training_end(self, runtime: Runtime) -> dict[str, float] | None:
        """A scorer on the final global model: figures to log once, outside the protocol, as
        ``score_round`` (it may use what that collected from the truth)."""

    @classmethod
    def hooks(cls) -> list[str]:
        return [h for h in HOOKS if getattr(cls, h) is not getattr(Plugin, h)]


def check_clients_and_rounds(federation, clients: list[int] | None, rounds: list[int] | None,
                             clients_field: str = "clients") -> None:
    """Refuse (ValueError) client ids and rounds an attack's options name that the federation does not
    have; None means every client or every round."""
    bad = [c for c in clients or [] if not 0 <= c < federation.num_clients]
    if bad:
        raise ValueError(f"{clients_field}: {bad} are not client ids (0..{federation.num_clients - 1})")
    bad = [r for r in rounds or [] if not 1 <= r <= federation.rounds]
    if bad:
        raise ValueError(f"rounds: {bad} are not rounds of this run (1..{federation.rounds})")


class HookChain:
    """Calls one hook point on every plugin in order; the round loop's only view of plugins."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins

    def client_side(self) -> HookChain:
        """The plugins that have client-side hooks, in order: all a client needs to run its round."""
        return HookChain([p for p in self.plugins if set(p.hooks()) & set(CLIENT_HOOKS)])

    def bind(self, runtime: Runtime) -> HookChain:
        """Give every plugin this runtime (a worker's copies arrive without one)."""
        for p in self.plugins:
            p.runtime = runtime
        return self

    def dispatch(self, round: RoundContext, client_id: int, state: State) -> State:
        for p in self.plugins:
            state = p.dispatch(round, client_id, state)
        return state

    @property
    def needs_peer_digests(self) -> bool:
        return any(p.needs_peer_digests for p in self.plugins)

    def client_data(self, client: ClientContext, examples: list[Example]) -> list[Example]:
        for p in self.plugins:
            examples = p.client_data(client, examples)
        return examples

    def local_training(self, client: ClientContext, training: LocalTraining) -> LocalTraining:
        for p in self.plugins:
            training = p.local_training(client, training)
        return training

    def client_update(self, client: ClientContext, update: State) -> State:
        for p in self.plugins:
            update = p.client_update(client, update)
        return update

    def transport(self, client: ClientContext, message: Message) -> Message | None:
        for p in self.plugins:
            message = p.transport(client, message)
            if message is None:
                return None
        return message

    def collusion(self, round: RoundContext, messages: list[Message]) -> list[Message]:
        for p in self.plugins:
            messages = p.collusion(round, messages)
        return messages

    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float]:
        return _merge(p.server_observation(round, messages) for p in self.plugins)

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        """The first plugin that aggregates wins; the aggregator, always last, always does."""
        for p in self.plugins:
            aggregate = p.aggregation(round, messages)
            if aggregate is not None:
                return aggregate
        raise RuntimeError("no plugin aggregated the round; federation.aggregator must return an aggregate")

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        for p in self.plugins:
            aggregate = p.post_aggregation(round, aggregate)
        return aggregate

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        return _merge(p.score_round(round, truth, metrics) for p in self.plugins)

    def training_end(self, runtime: Runtime) -> dict[str, float]:
        return _merge(p.training_end(runtime) for p in self.plugins)

    def checkpoint(self) -> list[dict]:
        """Every plugin's :meth:`Plugin.checkpoint`, in hook order."""
        return [p.checkpoint() for p in self.plugins]

    def restore(self, states: list[dict]) -> None:
        """Restore each plugin from its entry of :meth:`checkpoint`, taken from a chain of the same plan."""
        if len(states) != len(self.plugins):
            raise ValueError(f"the checkpoint holds {len(states)} plugin states, this run has {len(self.plugins)} plugins")
        for plugin, state in zip(self.plugins, states):
            plugin.restore(state)


def _merge(parts) -> dict[str, float]:
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part or {})
    return merged
