"""Causal language models and their tokenizers: loaded with from_pretrained, or built from a config.

Nothing here downloads unless ``model.name_or_path`` is a hub name and the machine is
online; tests save a tiny built model to disk and load it back through the same
from_pretrained path a user's checkpoint takes.

The memory options (``model.dtype``, ``quantization``, ``gradient_checkpointing``) apply to
the one frozen copy of the model the process holds, however many clients there are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .bounded_yaml import value_excerpt
from .errors import ScenarioError
from .hub import local_first
from .scenario import ModelConfig, Scenario

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EOS = "<|endoftext|>"
BYTE_VOCAB = 256 + 1  # every byte, plus the end-of-text token
MIN_VOCAB = 16
"""Fewer tokens than this is no tokenizer a model was trained with."""


def make_tokenizer(config: ModelConfig, public_texts: list[str]) -> PreTrainedTokenizerBase:
    """The scenario's tokenizer.

    A trained BPE sees only ``public_texts`` (the data's public split), never a
    client's private data nor the held-out non-members: otherwise the vocabulary
    itself would memorise planted canaries or separate members from non-members.
    """
    kind = config.tokenizer.kind
    if kind == "auto":
        kind = "model" if config.name_or_path else "bpe"
    if kind == "model":
        folder = Path(config.name_or_path).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise no_tokenizer_files(config, "the folder")
        tokenizer = local_first(
            lambda: AutoTokenizer.from_pretrained(config.name_or_path, trust_remote_code=config.trust_remote_code),
            config.name_or_path, "model.name_or_path", "a tokenizer (save_pretrained's files)",
        )
        if len(tokenizer) < MIN_VOCAB:  # transformers 5 builds an empty one from config.json alone
            raise no_tokenizer_files(config, f"it has {len(tokenizer)} tokens: the checkpoint")
    else:
        vocab = BYTE_VOCAB if kind == "byte" else config.tokenizer.vocab_size
        tokenizer = train_byte_level_bpe(public_texts, vocab)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
"""What tokenizer.save_pretrained writes, for one tokenizer family or another; a folder with none of them
has no tokenizer (transformers 4 then fails on a None path, transformers 5 builds an empty one)."""


def no_tokenizer_files(config: ModelConfig, what: str) -> ScenarioError:
    return ScenarioError(
        f"model.name_or_path: the tokenizer of {value_excerpt(config.name_or_path)}: {what} holds no tokenizer "
        "files; save the tokenizer beside the model (tokenizer.save_pretrained), or train one with "
        "model.tokenizer.kind bpe or byte")


def train_byte_level_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style); with vocab_size=257 it has no merges, i.e. plain bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def check_model_support(config: ModelConfig) -> None:
    """Refuse, before any run is recorded, a quantized load this machine cannot do.

    bitsandbytes' k-bit layers run on CUDA only; without this check the run would be opened
    in MLflow and then fail inside from_pretrained with an ImportError that names no field.
    """
    if config.quantization == "none":
        return
    missing = [] if torch.cuda.is_available() else ["CUDA GPU"]
    missing += [module for module in ("bitsandbytes", "accelerate") if importlib.util.find_spec(module) is None]
    if missing:
        raise ScenarioError(
            f"model.quantization: {config.quantization} needs a CUDA GPU and bitsandbytes (pip install bitsandbytes "
            f"accelerate); this machine has no {', no '.join(missing)}; use model.quantization none on this machine"
        )
    if config.pretrain.steps:
        raise ScenarioError("model.pretrain.steps: pretraining trains every weight, but model.quantization freezes "
                            "them quantized; set model.pretrain.steps 0 or model.quantization none")


def make_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """Load ``name_or_path`` with from_pretrained, or build ``arch`` with seeded initial weights, in
    ``model.dtype`` and ready to train as ``model.quantization`` and ``gradient_checkpointing`` say.

    The seed comes first in both cases, so the weights drawn after it (new embedding rows, and then the
    adapters' init in :func:`~fedsec_bench.tuning.apply_tuning`, the A that FFA-LoRA freezes) are the same
    in every run of the scenario.
    """
    torch.manual_seed(seed)
    if config.name_or_path:
        model = local_first(
            lambda: AutoModelForCausalLM.from_pretrained(config.name_or_path, **load_options(config)),
            config.name_or_path, "model.name_or_path", "a causal language model (save_pretrained's files)",
        )
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        if config.vocab is not None and config.vocab < len(tokenizer):
            raise ScenarioError(f"model.vocab: {config.vocab} is below the tokenizer's {len(tokenizer)} tokens, whose "
                                "ids would index past the embeddings; raise it, or leave it unset")
        model = _build(config, config.vocab or len(tokenizer), tokenizer.eos_token_id).to(DTYPES[config.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.loss_type is None:  # a class named *LMHeadModel (GPT-2): name what transformers falls back to,
        model.loss_type = "ForCausalLM"  # so that it does not warn "loss_type=None ... unrecognized" on first use
    prepare_for_training(model, config)
    return model


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings cover, as its config says; None if it says nothing."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_fits(model: PreTrainedModel, scenario: Scenario) -> None:
    """Refuse, before a run is recorded, a loaded checkpoint too short for the scenario's sequences.

    A built model's positions are checked with the schema (model.max_positions); a checkpoint's are known
    only once its config is read, and past them GPT-2 fails with an index error in the middle of round 1
    (Llama's rotary positions run on, untrained). Training sequences are data.seq_len tokens, plus the
    soft prompt with tuning.mode prompt; generation adds eval.max_new_tokens to a prompt of at most seq_len.
    """
    limit = max_positions(model)
    if limit is None:
        return
    problem = sequence_problem(scenario, limit, f"the {limit} positions of the checkpoint "
                               f"{value_excerpt(scenario.model.name_or_path)} (its config's position limit)")
    if problem:
        raise ScenarioError(problem)


def sequence_problem(scenario: Scenario, limit: int, what: str) -> str | None:
    """Why the scenario's sequences do not fit in ``limit`` positions (``what`` names them), or None."""
    virtual = scenario.tuning.prompt.num_virtual_tokens if scenario.tuning.mode == "prompt" else 0
    soft = f" + tuning.prompt.num_virtual_tokens ({virtual})" if virtual else ""
    if scenario.data.seq_len + virtual > limit:
        return (f"data.seq_len: {scenario.data.seq_len}{soft} exceeds {what}; lower data.seq_len to at most "
                f"{max(limit - virtual, 0)}")
    if scenario.eval_examples()[1] and scenario.eval.max_new_tokens + 1 + virtual > limit:
        return (f"eval.max_new_tokens: {scenario.eval.max_new_tokens} new tokens after a prompt of at least one{soft} "
                f"exceed {what}; lower eval.max_new_tokens to at most {max(limit - virtual - 1, 0)}")
    return None


def load_options(config: ModelConfig) -> dict:
    """from_pretrained's keyword arguments: dtype, trust_remote_code and the bitsandbytes config."""
    options = {"dtype": DTYPES[config.dtype], "trust_remote_code": config.trust_remote_code}
    if config.quantization == "4bit":
        # QLoRA (Dettmers et al. 2023): NF4 storage, double-quantized scales, matmuls in 16 bits
        compute = torch.bfloat16 if config.dtype == "float32" else DTYPES[config.dtype]
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    elif config.quantization == "8bit":
        options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return options


def prepare_for_training(model: PreTrainedModel, config: ModelConfig) -> None:
    """k-bit preparation (freeze, norms in float32) and gradient checkpointing, each only when asked.

    PEFT's preparation would switch checkpointing on by itself; here that is
    ``model.gradient_checkpointing``'s call alone. Checkpointing is non-reentrant, so
    adapters behind frozen embeddings get gradients without inputs that require them.
    Training then keeps no KV cache (recomputation cannot reuse one); ``generate`` still
    asks for one through its generation config.
    """
    if config.quantization != "none":
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def _build(config: ModelConfig, vocab: int, eos_id: int) -> PreTrainedModel:
    if config.arch == "gpt2":
        dropout = {} if config.dropout is None else {k: config.dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        return GPT2LMHeadModel(
            GPT2Config(
                n_layer=config.layers,
                n_embd=config.hidden,
                n_head=config.heads,
                vocab_size=vocab,
                n_positions=config.max_positions,
                bos_token_id=eos_id,
                eos_token_id=eos_id,
                **dropout,
            )
        )
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=config.hidden,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads or config.heads,
            intermediate_size=config.intermediate or 4 * config.hidden,
            vocab_size=vocab,
            max_position_embeddings=config.max_positions,
            attention_dropout=config.dropout or 0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )
    )
