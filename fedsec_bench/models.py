"""Causal language models and their tokenizers: loaded with from_pretrained, or built from a config.

Nothing here downloads unless ``model.name_or_path`` is a hub name and the machine is
online; tests save a tiny built model to disk and load it back through the same
from_pretrained path a user's checkpoint takes.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .scenario import ModelConfig

EOS = "<|endoftext|>"
BYTE_VOCAB = 256 + 1  # every byte, plus the end-of-text token


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
        tokenizer = AutoTokenizer.from_pretrained(config.name_or_path)
    else:
        vocab = BYTE_VOCAB if kind == "byte" else config.tokenizer.vocab_size
        tokenizer = train_byte_level_bpe(public_texts, vocab)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def make_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """Load ``name_or_path`` with from_pretrained, or build ``arch`` with seeded initial weights."""
    if config.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(config.name_or_path, dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        torch.manual_seed(seed)
        model = _build(config, config.vocab or len(tokenizer), tokenizer.eos_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


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
