"""The scenario schema: one YAML file that says what to train, on what, and what attacks and defends it.

Every section is a pydantic model with ``extra="forbid"`` so that a typo is an error
(with a did-you-mean), never a silently ignored key. The one way in is
:func:`parse_scenario`: it reads YAML with the safe loader, applies ``--set`` overrides,
validates, and turns every problem into a :class:`~fedsec_bench.errors.ScenarioError` whose lines
name the field path.
"""

from __future__ import annotations

import difflib
import re
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .bounded_yaml import MAX_DOCUMENT_BYTES, check_value, load_yaml, value_excerpt
from .errors import ScenarioError, excerpt


# Upper bounds on sizes, far above anything a run on one machine can use: a slip of the keyboard (an extra
# zero, 10**9) is refused with the bound named, instead of aborting the process later (a panic inside
# tokenizers, an out-of-memory kill) or running for days. Each field's description names its bound.
MAX_VOCAB = 2**20
"""Token vocabularies (the largest real ones are about 256k)."""
MAX_TOKENS = 2**20
"""Sequence lengths: data.seq_len, model.max_positions, soft prompts, generation budgets."""
MAX_LAYERS = 1024
MAX_HIDDEN = 2**16
MAX_HEADS = 1024
MAX_INTERMEDIATE = 2**18
MAX_BUILT_PARAMETERS = 10**10
"""A model built from a config (model.arch): 40 GB of float32 weights. Larger ones are loaded, not built."""
MAX_CLIENTS = 10**6
MAX_EXAMPLES = 10**6
"""Examples of one kind: per client, held out, public, evaluated, planted canary copies."""
MAX_SYNTHETIC_RECORDS = 2 * 10**6
"""Records the synthetic corpus draws (clients' pool, held-out and public splits together)."""
MAX_CANARIES = 10**5
MAX_STEPS = 10**7
"""Rounds, local steps, pretraining steps."""
MAX_EPOCHS = 10**4
MAX_BATCH = 2**16
"""Batch sizes and gradient accumulation."""
MAX_LORA_RANK = 2**14
SYNTHETIC_TOPICS = 8
"""Topics of the synthetic corpus (fedsec_bench.data.synthetic.TOPICS, which this module cannot import)."""
MAX_SEED = 2**63 - 1
"""Seeds fit a signed 64-bit integer (torch, NumPy and MLflow all take it)."""


class Section(BaseModel):
    """Unknown keys are errors; so are inf and nan (a learning rate of .inf would only show as a NaN loss)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TokenizerConfig(Section):
    kind: Literal["auto", "model", "bpe", "byte"] = Field(
        "auto",
        description="auto: the model's own when loading a saved model, else bpe. "
        "bpe: byte-level BPE trained on the public split with `tokenizers`. byte: 256 byte symbols.",
    )
    vocab_size: int = Field(1024, ge=260, le=MAX_VOCAB, description=f"Target vocabulary size for kind=bpe; at most "
                            f"{MAX_VOCAB:,}.")


class PretrainConfig(Section):
    steps: int = Field(0, ge=0, le=MAX_STEPS, description="Central training steps on data's public split before the "
                       f"federation; 0 = none; at most {MAX_STEPS:,}.")
    lr: float = Field(0.01, gt=0, description="AdamW learning rate of pretraining.")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description=f"Pretraining batch size; at most {MAX_BATCH:,}.")


class ModelConfig(Section):
    name_or_path: str | None = Field(
        None, description="Hugging Face model name or local directory, loaded with from_pretrained."
    )
    trust_remote_code: bool = Field(
        False, description="Let from_pretrained run the checkpoint's own Python code (only for checkpoints you trust)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute and storage dtype of the model's frozen weights. Exchanged updates stay "
        "float32 (the server averages in float32) unless a defense says otherwise."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the frozen weights quantized with bitsandbytes (4bit: NF4, as in QLoRA). Needs "
        "model.name_or_path, tuning.mode lora or prompt, a CUDA GPU and `pip install bitsandbytes`."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    arch: Literal["gpt2", "llama"] | None = Field(None, description="Build a fresh model of this architecture.")
    layers: int = Field(2, ge=1, le=MAX_LAYERS, description=f"Transformer blocks (arch only); at most {MAX_LAYERS:,}.")
    hidden: int = Field(64, ge=8, le=MAX_HIDDEN, description="Hidden size (arch only); divisible by heads; at most "
                        f"{MAX_HIDDEN:,}. A built model has at most {MAX_BUILT_PARAMETERS:,} parameters in all.")
    heads: int = Field(4, ge=1, le=MAX_HEADS, description=f"Attention heads (arch only); at most {MAX_HEADS:,}.")
    kv_heads: int | None = Field(None, ge=1, le=MAX_HEADS, description="llama only; defaults to heads, which it "
                                 f"must divide; at most {MAX_HEADS:,}.")
    intermediate: int | None = Field(None, ge=8, le=MAX_INTERMEDIATE, description="llama MLP width; defaults to "
                                     f"4*hidden; at most {MAX_INTERMEDIATE:,}.")
    vocab: int | None = Field(None, ge=8, le=MAX_VOCAB, description="Defaults to the tokenizer's vocabulary size, "
                              f"which it may not be below; at most {MAX_VOCAB:,}.")
    max_positions: int = Field(256, ge=8, le=MAX_TOKENS, description="Longest sequence the built model accepts; at "
                               f"most {MAX_TOKENS:,}.")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout of the built model (GPT-2's pdrop, Llama's attention dropout); "
        "None: the architecture's default (GPT-2 0.1, Llama 0). 0 is the best case for gradient inversion."
    )
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.arch is None):
            raise ValueError("set exactly one of model.name_or_path (load) or model.arch (build from config)")
        if self.arch is not None and self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        if self.arch is not None and self.tokenizer.kind == "model":
            raise ValueError("model.tokenizer.kind=model needs model.name_or_path; use bpe or byte with model.arch")
        if self.arch == "llama" and self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"model.kv_heads: {self.kv_heads} does not divide model.heads ({self.heads}), as each "
                             "key/value head serves a whole group of query heads; pick a divisor of model.heads")
        if self.arch is not None and self.built_parameters() > MAX_BUILT_PARAMETERS:
            raise ValueError(f"model: the model these sizes build has about {self.built_parameters():,} parameters, over "
                             f"the {MAX_BUILT_PARAMETERS:,} fedsec builds from a config; lower model.layers, hidden, "
                             "intermediate or vocab, or load a checkpoint with model.name_or_path")
        return self

    def built_parameters(self) -> int:
        """About how many weights ``arch`` builds (embeddings, attention, MLP; norms and biases left out), with the
        tokenizer's target vocabulary when model.vocab is unset."""
        h, layers = self.hidden, self.layers
        vocab = self.vocab or (257 if self.tokenizer.kind == "byte" else self.tokenizer.vocab_size)
        if self.arch == "gpt2":
            return vocab * h + self.max_positions * h + layers * 12 * h * h
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        return 2 * vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * (self.intermediate or 4 * h))


class LoraConfig(Section):
    r: int = Field(8, ge=1, le=MAX_LORA_RANK, description=f"LoRA rank; at most {MAX_LORA_RANK:,}.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Names of the layers adapted (e.g. c_attn, q_proj); None: PEFT's default "
        "for the architecture. A name the model lacks is refused, with the names it has."
    )
    aggregation: Literal["separate", "ffa", "exact"] = Field(
        "separate", description="separate: A and B averaged on their own (the mean of products is not the product "
        "of means). ffa: FFA-LoRA (Sun et al. 2024), A frozen at its seeded init, only B trained and exchanged. "
        "exact: FedEx-LoRA (Singhal et al. 2024), the server also folds the residual mean(B_i A_i) - mean(B) "
        "mean(A) into the frozen weight, so the global model is the clients' mean model exactly."
    )


class PromptConfig(Section):
    num_virtual_tokens: int = Field(8, ge=1, le=MAX_TOKENS, description="Length of the trained soft prompt; at most "
                                    f"{MAX_TOKENS:,}.")


class TuningConfig(Section):
    mode: Literal["full", "lora", "prompt"] = Field(
        "lora", description="What is trained and exchanged: every weight, LoRA adapters, or a soft prompt."
    )
    lora: LoraConfig = LoraConfig()
    prompt: PromptConfig = PromptConfig()


class CustomCanary(Section):
    """A secret of the user's own: planted ``repetitions`` times, or (0) already somewhere in the data."""

    text: str = Field(..., description="The text around the secret, with {secret} where it goes, e.g. "
                      "'my PIN is {secret}'. With data.format instruction or chat it is the response.")
    secret: str = Field(..., min_length=1, description="The secret itself; it must match format.")
    format: str = Field(
        ..., min_length=1, description="The secret's candidate space, one slot per character: # a digit, "
        "@ a lowercase letter, anything else itself. '####' is the 10,000 four-digit PINs."
    )
    prompt: str | None = Field(None, description="instruction/chat data: the question the text answers.")
    repetitions: int = Field(1, ge=0, le=MAX_EXAMPLES, description="Copies planted; 0: not planted, the data already "
                             f"holds it (measure the exposure of PII the data really contains); at most {MAX_EXAMPLES:,}.")
    client: int | None = Field(None, ge=0, le=MAX_CLIENTS, description="The client that holds the planted copies; "
                               f"default random; at most {MAX_CLIENTS:,}.")

    @model_validator(mode="after")
    def _secret_fits(self) -> CustomCanary:
        if "{secret}" not in self.text:
            raise ValueError("text must contain {secret} where the secret goes")
        if len(self.secret) != len(self.format) or not all(
            (f == "#" and c.isdigit()) or (f == "@" and c in "abcdefghijklmnopqrstuvwxyz") or (f not in "#@" and f == c)
            for c, f in zip(self.secret, self.format)
        ):
            raise ValueError(f"secret {value_excerpt(self.secret)} does not match format "
                             f"{value_excerpt(self.format)} (# a digit, @ a lowercase letter, any other character itself)")
        if not set(self.format) & {"#", "@"}:
            raise ValueError(f"format {value_excerpt(self.format)} has no # or @, so the secret is the "
                             "only candidate and its exposure is always 0; mark the secret's characters")
        return self


class CanaryConfig(Section):
    count: int | None = Field(
        None, ge=0, le=MAX_CANARIES, description="Number of distinct planted secrets; default 8 with source synthetic, "
        f"0 with files or datasets (nothing is planted into a user's data unless asked); at most {MAX_CANARIES:,}."
    )
    repetitions: list[Annotated[int, Field(ge=0, le=MAX_EXAMPLES)]] = Field(
        [1, 4], min_length=1, description="Cycled over canaries: how often each is inserted. At most "
        f"{MAX_EXAMPLES:,} copies of canaries are planted in all."
    )
    kinds: list[Literal["card", "phone", "email", "name"]] = Field(
        ["card", "phone", "email", "name"], min_length=1, description="Secret kinds, cycled over canaries."
    )
    clients: Annotated[list[Annotated[int, Field(ge=0, le=MAX_CLIENTS)]], Field(min_length=1)] | Literal["random"] = Field(
        "random", description="Which clients hold canaries (cycled), or one random client per canary."
    )
    custom: list[CustomCanary] = Field([], description="Secrets of your own, measured like the built-in ones.")


class PartitionConfig(Section):
    method: Literal["iid", "dirichlet", "quantity_skew", "natural"] = Field(
        "iid", description="iid: equal random shares. dirichlet: label skew over label_field. quantity_skew: "
        "client sizes ~ Dirichlet(alpha). natural: one client per distinct value of `by` (a user id), as "
        "flwr-datasets' NaturalIdPartitioner."
    )
    by: str | None = Field(None, description="natural only: the column naming each record's user.")
    select: Literal["largest", "random"] = Field(
        "largest", description="natural only, when the data has more users than federation.num_clients: keep "
        "the users with most records, or a seeded random sample of them."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for dirichlet and quantity_skew (smaller = more skewed).")
    min_examples: int = Field(2, ge=1, le=MAX_EXAMPLES, description="Every client gets at least this many examples "
                              f"(natural: users with fewer are left out); at most {MAX_EXAMPLES:,}.")

    @model_validator(mode="after")
    def _natural_by(self) -> PartitionConfig:
        if (self.method == "natural") != (self.by is not None):
            raise ValueError("data.partition.by names the user column, and is used (and needed) by method natural only")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "files", "datasets"] = Field(
        "synthetic", description="synthetic: the built-in corpus with canaries. files: local files. "
        "datasets: through datasets.load_dataset."
    )
    path: str | list[str] | None = Field(
        None, description="files: txt/jsonl/json/csv/parquet path(s). datasets: a dataset name or builder (json, "
        "csv...). A relative file path written in a scenario file is relative to that file's folder; one given "
        "with --set, to the current directory."
    )
    data_files: str | list[str] | None = Field(
        None, description="datasets only: passed to load_dataset; relative paths as for path."
    )
    split: str = Field("train", description="datasets only.")
    format: Literal["text", "instruction", "chat"] = Field(
        "text", description="text: plain documents, the loss on every token. instruction: prompt/response "
        "records (Alpaca style). chat: a list of {role, content} messages, the last one the assistant's response. "
        "The prompt is rendered with the tokenizer's chat template, else the built-in template (docs/models-and-data.md)."
    )
    text_field: str = Field("text", description="format text: the column holding the text.")
    instruction_field: str = Field("instruction", description="format instruction: the column holding the instruction.")
    input_field: str = Field("input", description="format instruction: the optional column with the instruction's input.")
    output_field: str = Field("output", description="format instruction: the column holding the response.")
    messages_field: str = Field("messages", description="format chat: the column holding the message list.")
    train_on_prompt: bool = Field(
        False, description="Take the loss on prompt tokens too. Default: on response tokens only (prompt tokens "
        "get the ignore index), as instruction tuning does."
    )
    label_field: str = Field("topic", description="Column used by dirichlet partitioning (synthetic data has topics).")
    examples_per_client: int = Field(32, ge=1, le=MAX_EXAMPLES, description="synthetic only: mean examples per "
                                     f"client; at most {MAX_EXAMPLES:,}, and the corpus draws at most "
                                     f"{MAX_SYNTHETIC_RECORDS:,} records in all.")
    topics: int = Field(8, ge=1, le=SYNTHETIC_TOPICS, description="synthetic only: number of topics, of the "
                        f"corpus's {SYNTHETIC_TOPICS}.")
    difficulty: Literal["uniform", "mixed"] = Field(
        "uniform", description="synthetic only. uniform: template sentences, all about equally predictable. "
        "mixed: the same sentences, half of them followed by 1-8 high-entropy tokens (random numbers, made-up "
        "words), so examples differ in intrinsic difficulty as in real text; drawn alike in every split, "
        "members and non-members included. What per-example calibration (reference, lira, rmia) corrects."
    )
    heldout_examples: int = Field(64, ge=2, le=MAX_EXAMPLES, description="Held-out (non-member) examples for eval "
                                  f"and attacks; at most {MAX_EXAMPLES:,}.")
    public_examples: int | None = Field(
        None, ge=0, le=MAX_EXAMPLES, description="Public examples, in no client's data and not held out: they train "
        "the BPE tokenizer and model.pretrain. Default: 256 when the scenario trains a tokenizer or pretrains, else 0 "
        f"(a checkpoint's own tokenizer needs none, so no user's records are spent on it); at most {MAX_EXAMPLES:,}."
    )
    seq_len: int = Field(
        64, ge=4, le=MAX_TOKENS, description="Tokens per example. A longer prompt/response pair loses the start of its "
        "prompt; a longer text is cut or chunked (long_texts). Both are counted (data.truncated_examples). At most "
        f"{MAX_TOKENS:,}, and at most the model's positions."
    )
    long_texts: Literal["truncate", "chunk"] = Field(
        "truncate", description="format text: a text longer than seq_len is cut (truncate) or split into "
        "seq_len-token examples of the same client (chunk); counted either way."
    )
    max_examples_per_client: int | None = Field(
        None, ge=1, description="Cap on each client's records (a seeded sample of them), e.g. for users with "
        "thousands of records."
    )
    duplicates: Literal["group", "drop"] = Field(
        "group", description="Exact duplicate records: group keeps every copy in one split (a repeated record "
        "is never both member and non-member); drop keeps one copy. Counted as data.duplicate_records."
    )
    heldout_by_user: bool = Field(
        False, description="partition natural: hold out whole users (every record of a held-out user is a "
        "non-member), as user-level attacks need. Default: held-out records are drawn from all users."
    )
    user_samples: int = Field(
        0, ge=0, le=MAX_EXAMPLES, description="Records of each client's user kept out of its training: the fresh "
        "samples a user-level attack (user_inference) holds. Needs partition natural and heldout_by_user. A seeded "
        "choice of records that occur once among the clients; a client keeps at least data.partition.min_examples "
        "for training, so a small one gives fewer (counted as data.user_samples_short). "
        f"At most {MAX_EXAMPLES:,}."
    )
    canaries: CanaryConfig = CanaryConfig()
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required with data.source={self.source}")
        if self.source == "synthetic":
            if self.path:
                raise ValueError("data.path is only read with data.source=files or datasets")
            if self.partition.method == "natural":
                raise ValueError("data.partition.method natural needs a user column: use data.source files or datasets")
            if self.format == "chat":
                raise ValueError("data.format chat needs files or datasets; the synthetic corpus is text or instruction")
        else:
            synthetic_only = [f for f in ("examples_per_client", "topics", "difficulty") if f in self.model_fields_set]
            if synthetic_only:
                raise ValueError(
                    f"data.{synthetic_only[0]} shapes the synthetic corpus only and is not read with "
                    f"data.source={self.source}; remove it"
                )
        if self.heldout_by_user and self.partition.method != "natural":
            raise ValueError("data.heldout_by_user holds out whole users: it needs data.partition.method natural")
        if self.user_samples and not (self.partition.method == "natural" and self.heldout_by_user):
            raise ValueError("data.user_samples keeps fresh records of each client's user, against whole held-out "
                             "users: it needs data.partition.method natural and data.heldout_by_user: true")
        planted = self.planted_copies()
        if planted > MAX_EXAMPLES:
            raise ValueError(f"data.canaries: {planted:,} canary copies would be planted, over the {MAX_EXAMPLES:,} "
                             "fedsec plants; lower data.canaries.count or data.canaries.repetitions")
        return self

    def planted_copies(self) -> int:
        """Copies of canaries planted into clients' data: the built-in ones (repetitions cycled) and the custom ones."""
        reps, count = self.canaries.repetitions, self.canary_count
        cycles, rest = divmod(count, len(reps))
        return cycles * sum(reps) + sum(reps[:rest]) + sum(c.repetitions for c in self.canaries.custom)

    @property
    def canary_count(self) -> int:
        """data.canaries.count, or its default for the source."""
        if self.canaries.count is not None:
            return self.canaries.count
        return 8 if self.source == "synthetic" else 0

    @property
    def is_prompted(self) -> bool:
        """Prompt/response records (instruction or chat), as opposed to plain text."""
        return self.format != "text"


class PluginSpec(BaseModel):
    """One attack, defense or aggregation rule: its registered ``name`` plus that plugin's own options."""

    model_config = ConfigDict(extra="allow")
    name: str


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Unset: start a Ray instance on this machine. auto: join the cluster started here with "
        "`ray start --head`. host:6379 or ray://host:10001: join that cluster.",
    )
    num_cpus_per_client: float = Field(1.0, gt=0, description="CPUs reserved by each client worker.")
    num_gpus_per_client: float = Field(0.0, ge=0, description="GPUs reserved by each client worker (fractions share one).")
    max_concurrency: int | None = Field(
        None, ge=1, le=MAX_CLIENTS,
        description="Client workers (Ray actors), i.e. clients training at once. Unset: as many as the "
        f"cluster's CPUs (and GPUs) allow, at most clients_per_round. At most {MAX_CLIENTS:,}.",
    )


class FederationConfig(Section):
    num_clients: int = Field(4, ge=1, le=MAX_CLIENTS, description="Registered clients, each with its own data; at most "
                             f"{MAX_CLIENTS:,}.")
    clients_per_round: int = Field(2, ge=1, le=MAX_CLIENTS, description="Sampled per round (the expected number with "
                                   f"poisson); at most num_clients and {MAX_CLIENTS:,}.")
    rounds: int = Field(3, ge=1, le=MAX_STEPS, description=f"Federated rounds; at most {MAX_STEPS:,}.")
    sampling: Literal["uniform", "poisson"] = Field(
        "uniform",
        description="uniform: exactly clients_per_round without replacement. "
        "poisson: each client independently with q = clients_per_round / num_clients.",
    )
    local_steps: int | None = Field(10, ge=1, le=MAX_STEPS, description="Optimizer steps per client per round; at most "
                                    f"{MAX_STEPS:,}.")
    local_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="Overrides local_steps when set; at most "
                                     f"{MAX_EPOCHS:,}.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description=f"Local batch size; at most {MAX_BATCH:,}.")
    lr: float = Field(1e-3, gt=0, description="Local learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Local optimizer, fresh each round.")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only.")
    weight_decay: float = Field(0.0, ge=0, description="Local optimizer weight decay.")
    server_lr: float = Field(1.0, gt=0, description="The aggregate update is scaled by this.")
    aggregator: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name="fedavg"),
        description="Aggregation rule: a name (fedavg, krum, ...) or {name: ..., <its options>}.",
    )
    grad_accumulation: int = Field(
        1, ge=1, le=MAX_BATCH, description="Batches whose gradients are summed into one optimizer step: the effective "
        "batch is batch_size x grad_accumulation at the memory of batch_size. local_steps counts optimizer steps. "
        f"At most {MAX_BATCH:,}."
    )
    eval_every: int = Field(1, ge=1, description="Evaluate every k rounds (and always after the last).")
    on_nonfinite: Literal["stop", "continue"] = Field(
        "stop", description="A non-finite training or evaluation loss, or a non-finite global model: stop ends the "
        "run FAILED at that round; continue logs it, tags the run fedsec.nonfinite=true and goes on."
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="Where clients train: local (one after another in this process) or ray (Ray workers)."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="executor: ray only.")

    @field_validator("aggregator", mode="before")
    @classmethod
    def _aggregator_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sizes(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) must be ≤ "
                f"federation.num_clients ({self.num_clients})"
            )
        return self

    @field_validator("executor")
    @classmethod
    def _ray_installed(cls, value: str) -> str:
        if value == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("ray is not installed; pip install 'fedsec-bench[ray]', or use executor: local")
        return value


class EvalConfig(Section):
    max_examples: Annotated[int, Field(ge=1, le=MAX_EXAMPLES)] | Literal["auto", "all"] = Field(
        "auto", description="Held-out examples the utility loss is measured on (the same first ones every "
        "evaluation). auto: a quarter of the sequences a round trains on (clients_per_round x local_steps x "
        "batch_size x grad_accumulation), at least 8, so a forward pass over them stays about a tenth of the "
        "round's training; all: the whole held-out split."
    )
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Examples per evaluation (and generation) batch; at "
                            f"most {MAX_BATCH:,}.")
    generation_examples: Annotated[int, Field(ge=0, le=MAX_EXAMPLES)] | Literal["auto"] = Field(
        "auto", description="instruction/chat data: held-out prompts answered by greedy decoding and scored "
        "against the reference response (utility.rougeL, utility.exact_match). auto: a quarter of the loss "
        "examples, at least 2; 0: no generation."
    )
    max_new_tokens: int = Field(32, ge=1, le=MAX_TOKENS, description="Generation budget per held-out prompt; at most "
                                f"{MAX_TOKENS:,}.")


MAX_DESCRIPTION = 5000
"""Characters of a run's description: MLflow 2's limit on a tag's value."""


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log to MLflow; the local run folder is written either way.")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("fedsec", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Defaults to the scenario name.")
    description: str | None = Field(
        None, max_length=MAX_DESCRIPTION, description="The MLflow run's description (its note). Defaults to the "
        f"scenario file's header comment; at most {MAX_DESCRIPTION:,} characters.",
    )
    output_dir: str = Field("fedsec-runs", description="Local folder for each run's artifacts and summary.json.")
    checkpoint_every: int = Field(
        1, ge=0, description="Write a resumable checkpoint every k rounds (and after the last); 0: never. "
        "`fedsec resume RUN_ID` continues from the latest one."
    )
    keep_checkpoints: int = Field(1, ge=1, description="Checkpoints kept in the run folder, the latest ones.")


class Scenario(Section):
    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Names the run and its folder; at most 100 characters.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds data, model, sampling and training: same seed, same "
                      f"figures. From 0 to {MAX_SEED:,} (2**63 - 1).")
    model: ModelConfig
    tuning: TuningConfig = TuningConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    eval: EvalConfig = EvalConfig()
    defenses: list[PluginSpec] = Field([], description="Defenses in force, each {name: ..., <options>}.")
    attacks: list[PluginSpec] = Field([], description="Attacks to run, each {name: ..., <options>}.")
    tracking: TrackingConfig = TrackingConfig()
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    matrix: dict[str, list[Any]] | None = Field(
        None,
        description="fedsec sweep only: {field path: [alternatives]}; one run per combination "
        "(e.g. {seed: [0, 1], defenses: [[], [{name: norm_clip}]]}); at most 1,000 combinations.",
    )

    @model_validator(mode="after")
    def _workload(self) -> Scenario:
        model, tuning = self.model, self.tuning
        if self.data.source == "synthetic":
            drawn = self.federation.num_clients * self.data.examples_per_client + self.data.heldout_examples
            drawn += self.public_examples
            if drawn > MAX_SYNTHETIC_RECORDS:
                raise ValueError(
                    f"data: the synthetic corpus would draw {drawn:,} records (federation.num_clients x "
                    "data.examples_per_client, plus data.heldout_examples and data.public_examples), over the "
                    f"{MAX_SYNTHETIC_RECORDS:,} it draws; lower them, or bring real data (data.source files)")
        if self.data.public_examples == 0 and self.needs_public_split:
            raise ValueError("data.public_examples: 0 leaves nothing to train the tokenizer (model.tokenizer.kind "
                             "bpe or byte) or to pretrain on; give it some, or use the checkpoint's tokenizer")
        virtual = tuning.prompt.num_virtual_tokens if tuning.mode == "prompt" else 0
        soft = f" + tuning.prompt.num_virtual_tokens ({virtual})" if virtual else ""
        if model.arch is not None and self.data.seq_len + virtual > model.max_positions:
            raise ValueError(f"data.seq_len ({self.data.seq_len}){soft} exceeds model.max_positions "
                             f"({model.max_positions}); raise model.max_positions or lower data.seq_len")
        answer = self.eval.max_new_tokens + 1 + virtual  # generation: a prompt of one token at least, then the answer
        if model.arch is not None and self.eval_examples()[1] and answer > model.max_positions:
            raise ValueError(f"eval.max_new_tokens: {self.eval.max_new_tokens} new tokens after a prompt of at least "
                             f"one{soft} exceed model.max_positions ({model.max_positions}); lower eval.max_new_tokens "
                             "or raise model.max_positions")
        if model.quantization != "none":
            if model.name_or_path is None:
                raise ValueError("model.quantization loads a checkpoint quantized: it needs model.name_or_path")
            if tuning.mode == "full":
                raise ValueError("model.quantization freezes quantized weights: use tuning.mode lora or prompt (QLoRA)")
        if model.dtype != "float32" and tuning.mode == "full":
            raise ValueError("model.dtype sets the frozen weights' dtype; tuning.mode full trains every weight and "
                             "keeps float32 master weights: use lora or prompt, or model.dtype float32")
        if tuning.mode == "lora" and tuning.lora.aggregation == "exact" and self.federation.executor == "ray":
            raise ValueError("tuning.lora.aggregation exact folds a residual into the driver's frozen weights, "
                             "which Ray workers do not see: use executor local, or aggregation separate or ffa")
        return self

    @field_validator("matrix")
    @classmethod
    def _matrix_lists(cls, value):
        for path, options in (value or {}).items():
            if not options:
                raise ValueError(f"matrix.{path}: give at least one alternative")
        return value

    @property
    def needs_public_split(self) -> bool:
        """A tokenizer is trained, or the model pretrained, on the public split."""
        kind = self.model.tokenizer.kind
        trains_tokenizer = kind in ("bpe", "byte") or (kind == "auto" and self.model.name_or_path is None)
        return trains_tokenizer or self.model.pretrain.steps > 0

    def eval_examples(self) -> tuple[int | None, int]:
        """(held-out examples the loss is measured on, None for all; prompts answered by generation)."""
        config, fed = self.eval, self.federation
        if config.max_examples == "auto":
            per_round = fed.clients_per_round * (fed.local_steps or 1) * fed.batch_size * fed.grad_accumulation
            loss = max(8, per_round // 4)
        else:
            loss = None if config.max_examples == "all" else config.max_examples
        if not self.data.is_prompted:
            return loss, 0
        if config.generation_examples != "auto":
            return loss, config.generation_examples
        return loss, max(2, (loss or self.data.heldout_examples) // 4)

    @property
    def public_examples(self) -> int:
        """data.public_examples, or its default for this scenario."""
        if self.data.public_examples is not None:
            return self.data.public_examples
        return 256 if self.needs_public_split else 0

    def digest(self) -> str:
        """A stable hash of the resolved scenario, logged as a tag so identical runs can be found."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def parse_scenario(source: str | Path | dict, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario against the schema; every problem becomes a ScenarioError.

    Its plugins are looked up and checked by :func:`fedsec_bench.plan.resolve`, which
    :func:`fedsec_bench.plan.load_scenario` adds to this."""
    raw = read_yaml(source) if not isinstance(source, dict) else plain_copy(source, "the scenario")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_scenario(raw)


def plain_copy(value: dict, where: str) -> dict:
    """A deep copy of a scenario given as a Python mapping, refused (a ScenarioError) if it is not plain
    JSON data within the YAML loader's bounds, so the Python API accepts what a file may hold."""
    check_value(value, where)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: not plain data ({excerpt(str(exc))}); use null, booleans, numbers, "
                            "strings, lists and mappings with string keys") from None


def read_yaml(path: str | Path) -> dict:
    """A scenario file as a mapping, read within :mod:`~fedsec_bench.bounded_yaml`'s bounds, its data
    paths anchored to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: {'not a file' if path.exists() else 'no such scenario file'}")
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_DOCUMENT_BYTES + 1)  # never more: the file may be huge
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ScenarioError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_DOCUMENT_BYTES:,} a scenario "
                                "may have; a scenario is a few kilobytes: put data in files named by data.path")
        text = data.decode("utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {exc.start}); save the scenario as UTF-8") from None
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping of sections (name, model, ...), got {type(raw).__name__}")
    _anchor_data_paths(raw, path.parent)
    if header := header_comment(text):
        tracking = raw.setdefault("tracking", {})
        if isinstance(tracking, dict):  # anything else is refused by the schema, naming the field
            tracking.setdefault("description", header[:MAX_DESCRIPTION])
    return raw


def header_comment(text: str) -> str:
    """The comment lines a scenario file starts with, without their ``#``: what it shows and how to read it."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def _anchor_data_paths(raw: dict, folder: Path) -> None:
    """Make the data files a scenario file names relative to its own folder, so it runs from anywhere
    (the bundled scenarios ship their data beside them). Dataset names (data.source datasets) are kept."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    keys = ["data_files"] + (["path"] if data.get("source") == "files" else [])
    for key in keys:
        value = data.get(key)
        if isinstance(value, str):
            data[key] = _anchored(value, folder)
        elif isinstance(value, list):
            data[key] = [_anchored(v, folder) if isinstance(v, str) else v for v in value]


def _anchored(path: str, folder: Path) -> str:
    try:
        return path if Path(path).expanduser().is_absolute() else str(folder / path)
    except (RuntimeError, ValueError):  # ~nosuchuser, or a NUL byte: left as written, for data.path to refuse
        return path


_INDEX = re.compile(r"\[([0-9]+)\]")


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (so 3, true, [1,2] work), within
    the same bounds as a scenario file. Every malformed override is a ScenarioError naming its path."""
    path, eq, text = item.partition("=")
    path = path.strip()
    if not eq:
        raise ScenarioError(f"--set {excerpt(item)}: expected PATH=VALUE, e.g. federation.rounds=5")
    if not path:
        raise ScenarioError(f"--set {excerpt(item)}: no field path before '=', e.g. federation.rounds=5")
    label = f"--set {excerpt(path)}"
    keys = field_keys(path, label)
    set_field(raw, keys, load_yaml(text, label, at=keys), label)


def field_keys(path: str, label: str) -> list[str]:
    """``attacks[0].max_norm`` (as errors print it) or ``attacks.0.max_norm`` as its keys; an empty part
    is a ScenarioError starting with ``label``."""
    keys = [key.strip() for key in _INDEX.sub(r".\1", path.strip()).split(".")]
    if not all(keys):
        raise ScenarioError(f"{label}: an empty part in the field path; name every part, e.g. "
                            "data.canaries.count or attacks[0].name")
    return keys


def set_field(raw: dict, keys: list[str], value: Any, label: str) -> None:
    """Set ``raw[k0][k1]...`` to ``value``, creating missing sections (never a missing list item); ``label``
    starts each error (``--set PATH``, or a sweep's ``matrix.PATH``)."""
    node: Any = raw
    for depth, key in enumerate(keys):
        here = ".".join(keys[:depth]) or "the scenario"
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = _index(node, key, here, label)
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            if node.get(key) is None:
                node[key] = [] if _is_index(keys[depth + 1]) else {}
            node = node[key]
        else:
            raise ScenarioError(f"{label}: {here} is {value_excerpt(node, 40)}, not a section with fields; set {here} "
                                f"itself, e.g. --set {here}=VALUE")


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _index(node: list, key: str, here: str, label: str) -> int:
    if not _is_index(key):
        raise ScenarioError(f"{label}: {here} is a list; name an item by its position, e.g. {here}.0 or {here}[0]")
    if len(key) > 9 or int(key) >= len(node):
        where = f"{here} has {len(node)} items, 0 to {len(node) - 1}" if node else f"{here} is an empty list"
        raise ScenarioError(f"{label}: index {excerpt(key, 20)} out of range ({where}); name an item it has, "
                            f"or set the whole list, e.g. --set '{here}=[...]'")
    return int(key)


def validate_scenario(raw: dict) -> Scenario:
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(capped(_union_merged([_describe(err) for err in exc.errors()]))) from None
    return scenario


MAX_PROBLEMS = 20
"""Error lines shown at once: a list of 100,000 wrong items is one problem, not a screenful."""


def capped(problems: list[str], limit: int = MAX_PROBLEMS) -> list[str]:
    """``problems`` without repeats, the first ``limit`` of them and a line saying how many more there are."""
    unique = list(dict.fromkeys(problems))
    if len(unique) <= limit:
        return unique
    return unique[:limit] + [f"scenario: {len(unique) - limit:,} more problems not shown; fix the ones above and check again"]


_UNION_BRANCH = re.compile(r"\.(constrained-int|int|str|float|list\[[^\]]*\]|literal\[[^\]]*\])(?=[:.\[])")


def _union_merged(lines: list[str]) -> list[str]:
    """A value that fits no branch of a union (a number or 'auto') fails once per branch; pydantic names
    each branch in the path. One line per field, its branches' reasons joined with "or"."""
    merged: dict[str, list[str]] = {}
    for line in lines:
        field, _, reason = _UNION_BRANCH.sub("", line, count=1).partition(": ")
        merged.setdefault(field, []).append(reason)
    return [f"{field}: {' or '.join(dict.fromkeys(reasons))}" if reasons != [""] else field
            for field, reasons in merged.items()]


def field_path(loc: tuple) -> str:
    """``data.canaries.custom[0].text`` from a pydantic location; a long key is cut (it may be a whole file)."""
    out = ""
    for part in loc:
        part = part if isinstance(part, int) else excerpt(str(part), 40)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "scenario"


_MESSAGES = {
    "greater_than_equal": "must be ≥ {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be ≤ {le:,}, the largest value fedsec accepts here",
    "less_than": "must be < {lt}",
    "missing": "is required",
}


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{field_path(loc)}: unknown field{suggest(loc[-1], _known_fields(loc[:-1]))}"
    if kind in _MESSAGES:
        return f"{field_path(loc)}: " + _MESSAGES[kind].format(**err.get("ctx", {}))
    if kind == "invalid_key":  # YAML reads yes/no/on/off as booleans, null and ~ as nothing, 1 as a number
        where = field_path(tuple(str(p) for p in loc[:-1]) + (str(err["input"]),))
        return (f"{where}: a field name must be text, and YAML read this one as {value_excerpt(err['input'])}; "
                "quote it, or remove it")
    if kind == "literal_error":
        return f"{field_path(loc)}: got {value_excerpt(err['input'])}, expected {err['ctx']['expected']}"
    msg = err["msg"].removeprefix("Value error, ")
    where = field_path(loc)
    if kind == "value_error" and (not loc or msg.startswith(f"{where}.") or msg.startswith(f"{where}:")):
        return msg  # a section's own check names its fields itself
    return f"{where}: {msg}"


def suggest(word: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(excerpt(str(word), 100), options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else (f" (known: {', '.join(options)})" if options else "")


def _known_fields(loc: tuple) -> list[str]:
    """The field names of the section at ``loc``, walking the schema (list indices skipped)."""
    model: type[BaseModel] = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in nested if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)
