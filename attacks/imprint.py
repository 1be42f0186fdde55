"""``imprint``: a malicious server turns GPT-2's first MLP into an imprint layer and reads inputs back one by one.

Fowl, Geiping, Czaja, Goldblum, Goldstein, ICLR 2022, "Robbing the Fed: Directly Obtaining
Private Data in Federated Learning with Modified Models"; on transformers, Fowl, Geiping,
Reich, Wen, Czaja, Goldblum, Goldstein 2022, "Decepticons: Corrupted Transformers Breach
Privacy in Federated Learning for Language Models" (breaching's ``ImprintBlock``).

Threat and assumptions. The server controls every weight it sends (``tuning.mode: full``) and
the architecture is GPT-2, whose block 0 has a LayerNorm with a bias (``ln_2``) before an MLP
(``mlp.c_fc``, width 4 x hidden). It sends targeted clients in attacked rounds the global
state with block 0 rewritten (:func:`plant`); the client trains on it as usual. The clients
cannot tell unless a defense compares models (``model_consistency``). Embedding dropout must
be off (``model.dropout: 0``; a config, not a weight the server sends): with GPT-2's default 0.1
the read inputs are dropped-out embeddings that match no candidate, and nothing is claimed
(benchmark setting, batch 1: token recall 0 against 1 at dropout 0). lora and prompt modes
are refused (the base weights are frozen: the client already holds them, the server cannot
change them), and so is LLaMA (RMSNorm has no bias, its MLP no bias and a SwiGLU gate, so no
unit can hold a threshold).

The imprint. With attention's output zeroed, the input of block 0's MLP at a position is
x = LayerNorm(wte[token] + wpe[position]) (before ln_2's affine), which the server computes for
every candidate (token, position). Hidden unit j gets the pre-activation s (m.x - t_j): one
measurement direction m for all, increasing thresholds t_j; every unit writes the same small
vector to the residual, so dL/d(unit j) = g is the same for all j. With GELU' close to a step for
large s, the gradient of c_fc's column j is the sum over inputs with m.x > t_j of g(x) y(x) (y the
MLP's input); consecutive differences isolate the inputs between t_j and t_{j+1}, and give y
exactly when one input is alone in its bin. GELU' differs from the step by less than
phi(z) (|z| + 1) at z = s * (distance to the threshold): below 1e-20 once an input is 1e-4 of a
measurement unit from a threshold at s = 1e5; an input closer spreads over two adjacent bins,
still exact while both hold nothing else. The thresholds sit at quantiles of m.x over the
candidates weighted by the public split's (token, position) frequencies, half-way between
neighbouring candidates, so bins are about equiprobable for client data.

Where the paper puts the threshold in a bias (column s m, bias -s t_j; y = x / db), this holds it
in a homogeneous coordinate: ``ln_2`` gets weight a and bias a, so y = a (x + 1), and column j is
w (m - t_j / d * 1) with bias 0; x sums to zero and m is centred, so y . column_j = a w (m.x - t_j),
the same pre-activation with s = a w. The bias gradient (the bin's sum of g) is then the sum of
the weight gradient's coordinates over a d: everything is read from the weight gradient, a times
larger than the bias's. That matters under secure aggregation: its fixed-point encoding (2^-32)
erases a bias gradient of 1e-13 but keeps the weight's. The columns are small
(w = :data:`WEIGHT_SCALE`) and the input large.

Bins. With n inputs (tokens that receive a gradient: every non-padding position but each
sequence's last) in N equiprobable bins, the expected number of inputs alone in their bin is
n (1 - 1/N)^(n-1): every input is read at batch 1 (n << N), about N/e at n = N, and it falls
towards zero beyond. n counts distinct (token, position) inputs: the same token at the same
position in two sequences (common at the first positions) is one point of the measurement,
shares one bin and reads back as one input. In float32 a bin whose input's gradient g is
tiny next to the cumulative sums it is the difference of reads with an error (the sums are
rounded to 6e-8 of their size); matching drops such a read rather than mis-reading it, so a
few isolated inputs are lost at large batches, none at batch 1 in the tests.

Every candidate is held in memory (vocab x seq_len x hidden doubles: 8 MB for the tiny models
here, far too much for GPT-2 small's 50257 x 1024 x 768); a real model would match in chunks.

What is read. The server reads updates it can see (plain messages, updates isolated
from a secure aggregate by ``model_inconsistency``) and, when no targeted update is readable
but every delivered client trained on the imprint, the aggregate: bins add across clients, so
the bins occupied by one input of the union are still read (Robbing the Fed, section 4).

Figures (per attacked client, mean; ``imprint.aggregate.*`` for the aggregate; higher is
more leakage unless said):
* ``imprint.recovered_tokens``: (token, position) pairs read back;
* ``imprint.token_recall`` / ``token_precision`` / ``rouge1`` / ``rouge2`` / ``rougeL`` /
  ``exact_match`` (and ``_max``): the recovered inputs, set into sequences by position, against
  the batch the client trained on (metrics.py); ``baseline_rouge1`` the random-token floor;
* ``imprint.inputs`` (tokens with a gradient), ``imprint.distinct_inputs`` (n), ``imprint.bins`` (N),
  ``imprint.isolated_bins_expected`` (the formula, on n);
* ``imprint.attacked_clients``, ``imprint.unreadable_clients`` (targeted clients whose update the
  server could not read: hidden, or trained on another model), ``imprint.exact_gradient``
  (1 when -update/lr is the gradient itself: FedSGD with SGD; otherwise the bins blur).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin, check_clients_and_rounds

from .gradient_inversion import metrics
from .gradient_inversion.ground_truth import trained_sequences
from .gradient_inversion.model_view import exact_gradient, pseudo_gradient, readable

TABLE = "imprint_table.csv"
WEIGHT_SCALE = 1e-4
"""w: the size of c_fc's planted columns; the sharpness s comes from ln_2's gain a = s / w (module docstring)."""
BLOCK = "h.0."
PLANTED = ("attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
           "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


class ImprintOptions(Options):
    target_clients: list[int] | None = Field(None, description="Clients sent the imprint; None: every sampled client.")
    rounds: list[int] | None = Field(None, description="Rounds attacked (1-based); None: every round.")
    bins: int | None = Field(None, ge=2, le=2**20, description="Imprint bins; None: the MLP width (at most that).")
    sharpness: float = Field(1e5, ge=1.0, le=1e7, description="s: a unit's pre-activation per unit of measurement "
                             "(GELU' is a step beyond a few 1/s of its threshold).")
    residual_share: float = Field(0.1, gt=0, le=1, description="Norm the imprint adds to the residual, over the "
                                  "embedding's (mean over public inputs): small keeps the rest of the model working.")
    tolerance: float = Field(0.05, gt=0, lt=1, description="Relative distance to the nearest candidate input that "
                             "counts as a match.")
    attack_aggregate: bool = Field(True, description="Read the aggregate when no targeted update is readable.")


@dataclass
class ImprintLayer:
    """One round's imprint, as the server built it: what it plants and what it reads with."""

    direction: torch.Tensor
    """m: the centred unit measurement direction (hidden,)."""
    thresholds: torch.Tensor
    """t_j, increasing (bins,); t_0 lies below every candidate, so every input falls in a bin."""
    candidates: torch.Tensor
    """LayerNorm(wte[v] + wpe[p]) without affine, for every candidate, (vocab * positions, hidden)."""
    positions: int
    output: torch.Tensor
    """The vector every unit writes to the residual (hidden,)."""
    gain: float
    """a: ln_2's weight and bias, so the MLP's input is a (x + 1)."""
    fc_weight: torch.Tensor
    """The planted c_fc weight, to tell which clients trained on the imprint."""


@dataclass
class Attempt:
    """Inputs the server read from one update (one client's, or the aggregate), waiting for the scorer."""

    prefix: str
    clients: list[int]
    inputs: list[tuple[int, int]]
    """(token, position) pairs read back."""
    bins: int
    seconds: float
    seed: int


def expected_isolated(n: int, bins: int) -> float:
    """n (1 - 1/N)^(n-1): the expected inputs alone in their bin, n inputs in N equiprobable bins."""
    return n * (1 - 1 / bins) ** (n - 1) if n else 0.0


def block_names(state: State) -> tuple[str, str, dict[str, str]]:
    """The token and position embeddings' names and block 0's planted parameters' names, by role."""
    wte = next(n for n in state if n.endswith("transformer.wte.weight"))
    base = wte[: -len("wte.weight")]
    return wte, base + "wpe.weight", {part: base + BLOCK + part for part in PLANTED}


def embeddings(state: State, positions: int) -> torch.Tensor:
    """wte[v] + wpe[p], what block 0 receives, for every candidate (token, position): row v * positions + p."""
    wte, wpe, _ = block_names(state)
    x = state[wte].double()[:, None, :] + state[wpe].double()[None, :positions, :]
    return x.reshape(-1, x.shape[-1])


def normalised_inputs(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The MLP's input before ln_2's affine once attention writes nothing: LayerNorm(x)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def public_frequencies(runtime, vocab: int, positions: int) -> torch.Tensor:
    """How often each (token, position) is an input with a gradient in the public split (every position
    of an encoded example but its last), row v * positions + p: the server's prior for client data."""
    counts = torch.zeros(vocab, positions, dtype=torch.float64)
    for encoded in runtime.batcher.encode(runtime.data.public):
        ids = torch.tensor(encoded.ids[:-1], dtype=torch.long)
        counts.index_put_((ids, torch.arange(len(ids))), torch.ones(len(ids), dtype=torch.float64), accumulate=True)
    return counts.reshape(-1)


def quantile_thresholds(measure: torch.Tensor, weight: torch.Tensor, bins: int) -> torch.Tensor:
    """Thresholds at the weighted quantiles k/N of the measurements, each half-way between the two
    neighbouring candidates (no candidate sits on a threshold); t_0 below every candidate.
    Quantiles that fall between the same two candidates are one threshold: fewer bins, never empty ones."""
    order = torch.argsort(measure)
    sorted_measure, cumulative = measure[order], torch.cumsum(weight[order], 0)
    cumulative = cumulative / cumulative[-1]
    quantiles = torch.arange(1, bins, dtype=torch.float64) / bins
    cut = torch.searchsorted(cumulative, quantiles).clamp(max=len(measure) - 2).unique()
    middle = (sorted_measure[cut] + sorted_measure[cut + 1]) / 2
    return torch.cat([sorted_measure[:1] - 1.0, middle])


def build_layer(runtime, state: State, options: ImprintOptions, seed: int) -> ImprintLayer:
    """The round's imprint from the global model and the public split: direction, thresholds, output."""
    config = runtime.model.config
    positions = runtime.scenario.data.seq_len
    x = embeddings(state, positions)
    candidates = normalised_inputs(x, config.layer_norm_epsilon)
    hidden, width = candidates.shape[1], mlp_width(config)
    weight = public_frequencies(runtime, len(candidates) // positions, positions)
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden, generator=generator, dtype=torch.float64)
    direction = direction - direction.mean()
    direction = direction / direction.norm()
    measure = candidates @ direction
    thresholds = quantile_thresholds(measure, weight, options.bins or width)
    output = torch.randn(hidden, generator=generator, dtype=torch.float64)
    output = output / output.norm() * output_norm(x, measure, thresholds, weight, options)
    gain = options.sharpness / WEIGHT_SCALE
    fc_weight = torch.zeros(hidden, width, dtype=torch.float64)
    fc_weight[:, : len(thresholds)] = WEIGHT_SCALE * (direction[:, None] - thresholds[None, :] / hidden)
    return ImprintLayer(direction, thresholds, candidates, positions, output, gain, fc_weight)


def output_norm(x: torch.Tensor, measure, thresholds, weight, options: ImprintOptions) -> float:
    """|v| such that the units' sum, about s * sum_j (m.x - t_j)+ * v, adds ``residual_share`` of the
    embedding's norm to the residual, on average over public inputs."""
    active = (measure[:, None] - thresholds[None, :]).clamp_min(0).sum(1)
    share = weight / weight.sum()
    return float(options.residual_share * (share @ x.norm(dim=1)) / (options.sharpness * (share @ active)))


def mlp_width(config) -> int:
    return config.n_inner or 4 * config.n_embd


def plant(state: State, layer: ImprintLayer) -> State:
    """The global state with block 0 turned into the imprint; a new dict, ``state`` untouched.

    Attention writes nothing (c_proj = 0), so the MLP sees the embedding alone; ln_2's gain and
    bias a make its input a (x + 1); c_fc's first N columns are the bins, the others and their
    output rows zero (no gradient); every bin writes ``output`` to the residual."""
    _, _, names = block_names(state)
    hidden, width = layer.fc_weight.shape
    bins = len(layer.thresholds)
    projection = torch.zeros(width, hidden, dtype=torch.float64)
    projection[:bins] = layer.output
    planted = {
        "attn.c_proj.weight": torch.zeros(hidden, hidden), "attn.c_proj.bias": torch.zeros(hidden),
        "ln_2.weight": torch.full((hidden,), layer.gain), "ln_2.bias": torch.full((hidden,), layer.gain),
        "mlp.c_fc.weight": layer.fc_weight, "mlp.c_fc.bias": torch.zeros(width),
        "mlp.c_proj.weight": projection, "mlp.c_proj.bias": torch.zeros(hidden),
    }
    crafted = dict(state)
    for part, value in planted.items():
        crafted[names[part]] = value.to(state[names[part]].dtype)
    return crafted


def read_bins(weight_grad: torch.Tensor, layer: ImprintLayer) -> torch.Tensor:
    """x read from every bin holding something, (bins read, hidden): an input exactly where the bin holds
    one input alone, a mixture otherwise.

    The difference of consecutive columns, dW_j - dW_{j+1} = sum over the bin's inputs of g a (x + 1),
    sums over its coordinates to d a sum g (x sums to zero): the bias gradient's difference times a d,
    read from the weight itself, at the weight's scale (the bias gradient is a times smaller, below a
    secure aggregate's fixed-point resolution). Their ratio is x + 1."""
    bins, hidden = len(layer.thresholds), weight_grad.shape[0]
    w = weight_grad[:, :bins].double()
    dw = w - torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], 1)
    mass = dw.sum(0) / hidden
    held = mass != 0  # an empty bin's two sums hold the same terms in the same order: they cancel exactly
    return (dw[:, held] / mass[held]).T - 1


def match(read: torch.Tensor, layer: ImprintLayer, tolerance: float) -> list[tuple[int, int]]:
    """The (token, position) nearest each read input, where it lies within ``tolerance`` (relative
    distance): a mixture of several inputs is far from every candidate and is dropped."""
    if not len(read):
        return []
    distance = torch.cdist(read, layer.candidates)
    nearest = distance.argmin(1)
    relative = distance.gather(1, nearest[:, None])[:, 0] / layer.candidates[nearest].norm(dim=1)
    found = nearest[relative < tolerance].tolist()
    return sorted({(i // layer.positions, i % layer.positions) for i in found}, key=lambda vp: (vp[1], vp[0]))


def sequences_by_position(inputs: list[tuple[int, int]], special: set[int]) -> list[list[int]]:
    """The read inputs as sequences: the k-th token read at each position goes to sequence k (the
    server does not know which sequence an input came from)."""
    by_position: dict[int, list[int]] = defaultdict(list)
    for token, position in inputs:
        if token not in special:
            by_position[position].append(token)
    depth = max((len(tokens) for tokens in by_position.values()), default=0)
    return [[tokens[k] for _, tokens in sorted(by_position.items()) if k < len(tokens)] for k in range(depth)]


class Imprint(Plugin):
    name = "imprint"
    kind = "attack"
    summary = "malicious server plants an imprint layer in GPT-2's first MLP and reads single inputs from its gradient"
    on_instruction_data = ("reads (token, position) inputs of the whole rendered sequence, prompt tokens included "
                           "when they receive a gradient; scored on the whole sequence")
    modes = frozenset({"full"})
    OptionsModel = ImprintOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.layers: dict[int, ImprintLayer] = {}
        self.unread: tuple[list[Message], list[Message]] = ([], [])
        """The round's targeted messages the server could not read, and all it received."""
        self.attempts: list[Attempt] = []
        self.rows: list[dict] = []

    @classmethod
    def check(cls, options, scenario) -> None:
        mode, model = scenario.tuning.mode, scenario.model
        if mode != "full":
            raise ValueError(f"imprint rewrites block 0's weights, which tuning.mode {mode} keeps frozen on the "
                             "client (the server cannot change them); use tuning.mode full")
        if model.arch == "llama":
            raise ValueError("imprint needs GPT-2 (model.arch gpt2): LLaMA's RMSNorm has no bias and its MLP no "
                             "bias and a SwiGLU gate, so no unit can hold a threshold")
        if model.arch == "gpt2" and options.bins is not None and options.bins > 4 * model.hidden:
            raise ValueError(f"bins: {options.bins} is over the MLP width 4 x model.hidden = {4 * model.hidden}")
        check_clients_and_rounds(scenario.federation, options.target_clients, options.rounds, "target_clients")

    # --- hooks ---------------------------------------------------------------------
    def dispatch(self, round: RoundContext, client_id: int, state: State) -> State:
        """Targeted clients in attacked rounds get the imprint; everyone else ``state`` itself."""
        if not self._attacks(round.round) or not self._targets(client_id):
            return state
        if round.round not in self.layers:
            self._check_model()
            self.layers[round.round] = build_layer(self.runtime, round.global_state, self.options,
                                                   self.runtime.seed_for(round.round))
        return plant(state, self.layers[round.round])

    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float] | None:
        layer = self.layers.get(round.round)
        if layer is None:
            return None
        targeted = [m for m in messages if self._targets(m.client_id)]
        plain = [m for m in targeted if readable(m, round.global_state) and self._trained_on(round, m.client_id)]
        self.attempts += [self._read(round, "imprint", m.payload, [m]) for m in plain]
        read = {m.client_id for m in plain}
        self.unread = ([m for m in targeted if m.client_id not in read], messages)
        fed = self.runtime.scenario.federation
        return {"imprint.attacked_clients": float(len(plain)),
                "imprint.unreadable_clients": float(len(targeted) - len(plain)),
                "imprint.exact_gradient": float(exact_gradient(fed, [m.num_examples for m in targeted]))}

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """Targeted updates the server could not read: those a malicious server isolated from the aggregate
        (``round.isolated``) are read as plain ones; otherwise the aggregate, when every delivered client
        trained on the imprint (bins add across clients; an honest client's gradient would blur them)."""
        (unread, messages), self.unread = self.unread, ([], [])
        isolated = [m for m in unread if m.client_id in round.isolated and self._trained_on(round, m.client_id)]
        if isolated:
            self.attempts += [self._read(round, "imprint", round.isolated[m.client_id], [m]) for m in isolated]
        elif (unread and self.options.attack_aggregate and isinstance(aggregate, dict)
              and all(self._trained_on(round, m.client_id) for m in messages)):
            self.attempts.append(self._read(round, "imprint.aggregate", aggregate, messages))
        return aggregate

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics_so_far: dict[str, float]) -> dict[str, float] | None:
        """Each read against what its clients really trained on."""
        attempts, self.attempts = self.attempts, []
        self.layers.pop(round.round, None)
        if not attempts:
            return None
        scored = [(a.prefix, self._score(round.round, a)) for a in attempts]
        self.rows += [row for _, row in scored]
        self.runtime.write_table(TABLE, self.rows)
        figures: dict[str, float] = {}
        for prefix in dict.fromkeys(p for p, _ in scored):
            rows = [row for p, row in scored if p == prefix]
            figures |= metrics.summarize(rows, prefix)
            figures |= {f"{prefix}.{name}": float(np.mean([r[name] for r in rows]))
                        for name in ("recovered_tokens", "inputs", "distinct_inputs", "bins", "isolated_bins_expected")}
        return figures

    # --- one read ------------------------------------------------------------------
    def _read(self, round: RoundContext, prefix: str, update: State, messages: list[Message]) -> Attempt:
        """The inputs of one update, from what the server knows: its imprint and the update."""
        layer, fed = self.layers[round.round], self.runtime.scenario.federation
        started = time.perf_counter()
        sent = round.sent_to(messages[0].client_id)
        grad = pseudo_gradient(update, sent, fed, max(m.num_examples for m in messages))
        _, _, names = block_names(sent)
        read = read_bins(grad[names["mlp.c_fc.weight"]], layer)
        inputs = match(read, layer, self.options.tolerance)
        clients = [m.client_id for m in messages]
        return Attempt(prefix, clients, inputs, len(layer.thresholds), time.perf_counter() - started,
                       self.runtime.seed_for(round.round, *clients))

    def _score(self, rnd: int, attempt: Attempt) -> dict:
        rt = self.runtime
        true_ids = [seq.ids for cid in attempt.clients for seq in trained_sequences(rt, rnd, cid)]
        guess = sequences_by_position(attempt.inputs, set(rt.tokenizer.all_special_ids))
        figures, true_text, guess_text = metrics.score(rt.tokenizer, true_ids, guess)
        n = sum(len(ids) for ids in true_ids)  # every position but the closing end-of-text has a gradient
        distinct = len({(t, p) for ids in true_ids for p, t in enumerate(ids)})  # positions exact for plain text
        return {
            "round": rnd, "client": attempt.clients[0] if attempt.prefix == "imprint" else "aggregate", **figures,
            "baseline_rouge1": metrics.random_baseline(rt.tokenizer, true_ids, np.random.default_rng(attempt.seed)),
            "seconds": attempt.seconds, "applicable": 1.0, "rank_condition": None,
            "recovered_tokens": float(len(attempt.inputs)), "inputs": float(n), "distinct_inputs": float(distinct),
            "bins": float(attempt.bins), "isolated_bins_expected": expected_isolated(distinct, attempt.bins),
            "true_text": true_text, "reconstructed_text": guess_text,
        }

    # --- who and when --------------------------------------------------------------
    def _attacks(self, rnd: int) -> bool:
        return self.options.rounds is None or rnd in self.options.rounds

    def _targets(self, client_id: int) -> bool:
        return self.options.target_clients is None or client_id in self.options.target_clients

    def _trained_on(self, round: RoundContext, client_id: int) -> bool:
        """Whether the client received this round's imprint (a plugin dispatching after this one may
        have sent it another model)."""
        sent = round.sent_to(client_id)
        name = block_names(sent)[2]["mlp.c_fc.weight"]
        return torch.equal(sent[name], self.layers[round.round].fc_weight.to(sent[name].dtype))

    def _check_model(self) -> None:
        """A loaded checkpoint (model.name_or_path) is only known once built: it must be GPT-2 and wide enough."""
        config = self.runtime.model.config
        if config.model_type != "gpt2":
            raise ValueError(f"imprint needs a GPT-2 model, this one is {config.model_type!r}")
        if self.options.bins is not None and self.options.bins > mlp_width(config):
            raise ValueError(f"imprint bins: {self.options.bins} is over the MLP width {mlp_width(config)}")
