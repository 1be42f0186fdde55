"""How every measurement reads a language model: eval mode, the log-prob of each token, greedy decoding.

Utility, membership inference, canary exposure and the poisoning attacks all score or
decode the same model in every tuning mode. Doing it once here keeps their figures
comparable: the same dropout state, the same handling of PEFT prompt tuning's soft
prompt (its virtual tokens come before the text and are no position of it), the same
greedy decoder.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, PeftType
from torch.utils.data import DataLoader

from .data.batching import IGNORE_INDEX

GENERATION_BATCH = 64  # prompts per generate call: bounds the KV cache's memory


@contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode (no dropout) for the block; the model's previous mode comes back even if the block raises.

    Measurements run between training steps: leaving the model in eval mode would
    silently switch dropout off for the rest of training.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def input_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at the input's own positions: position t predicts token t + 1.

    Under PEFT prompt tuning the forward pass prepends the soft prompt's virtual tokens
    and returns their logits too; they are cut so position t is always the t-th input
    token. In the other modes the cut is a no-op.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -input_ids.shape[1] :]


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_t | tokens_<t), is_target) for t = 1 … T−1, both shaped like ``labels[:, 1:]``.

    ``logits`` come from :func:`input_logits` of the same batch. ``is_target`` is False
    where the label is IGNORE_INDEX (padding); the log-prob there is meaningless.
    Log-softmax runs in float32, so half-precision models score as finely as full ones.
    """
    target = labels[:, 1:]
    is_target = target != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), is_target


@torch.inference_mode()
def example_logprobs(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> list[np.ndarray]:
    """The log-prob of every predicted token of every example, in the loader's order, in eval mode.

    One float64 vector per example, as long as its own predicted tokens (padding
    excluded): the statistic every membership score and the canaries' perplexity use.
    """
    out: list[np.ndarray] = []
    with evaluating(model):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = input_logits(model, batch["input_ids"], batch["attention_mask"])
            logp, is_target = target_logprobs(logits, batch["labels"])
            out.extend(row[keep].cpu().numpy().astype(np.float64) for row, keep in zip(logp, is_target))
    return out


@torch.inference_mode()
def greedy_continuations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    device: torch.device,
    batch_size: int = GENERATION_BATCH,
) -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded, cut at its first EOS and at its budget.

    Prompts are token ids so that generation starts from exactly the tokens training
    saw (:meth:`~fedsec_bench.data.batching.Batcher.prompt_ids` builds them from
    examples). ``max_new_tokens`` is one budget for all prompts or one per prompt.
    Prompts are decoded in batches with ``model.generate`` (``do_sample=False``, KV
    cache), left-padded with an attention mask so every row continues exactly as it
    would alone. Rows are independent, so the first k greedy tokens of a longer run are
    the k-token run: one batch serves different budgets.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limit = position_limit(model)
    if limit is not None:  # a prompt loses its start, as in training, so that prompt + answer fit the positions
        prompts = [p[max(0, len(p) - max(1, limit - b)) :] for p, b in zip(prompts, budgets)]
    outputs: list[str] = []
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            input_ids, attention_mask = left_padded(prompts[rows], pad_id, device)
            new = greedy_new_tokens(
                model, input_ids, attention_mask, max(budgets[rows]), pad_id, tokenizer.eos_token_id
            )
            for tokens, budget in zip(new.tolist(), budgets[rows]):
                tokens = tokens[:budget]
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
                outputs.append(tokenizer.decode(tokens))
    return outputs


def position_limit(model: torch.nn.Module) -> int | None:
    """The most token positions a sequence may take (a soft prompt's virtual tokens come off), if the
    model has a limit in its config (GPT-2's n_positions, Llama's max_position_embeddings)."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is not None and is_prompt_tuned(model):
        limit -= model.active_peft_config.num_virtual_tokens
    return limit


def left_padded(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the padding before each sequence, so all rows end at the last column."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def greedy_new_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
) -> torch.Tensor:
    """The greedily generated tokens alone (batch x new), in every tuning mode; finished rows are padded.

    Under PEFT prompt tuning the base model generates from :func:`soft_prompted` inputs.
    ``PeftModel.generate`` itself is not used: it drops the position ids, so a
    left-padded row would sit at shifted positions, and with the KV cache its decoding
    steps mask the soft prompt wrongly (peft 0.21, transformers 5); both change the
    greedy tokens. From embeddings, generate returns the new tokens alone.
    """
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                      eos_token_id=eos_id)
    if is_prompt_tuned(model):
        embeds, mask = soft_prompted(model, input_ids, attention_mask)
        return model.get_base_model().generate(inputs_embeds=embeds, attention_mask=mask, **generation)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation)[:, input_ids.shape[1] :]


def is_prompt_tuned(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel) and model.active_peft_config.peft_type == PeftType.PROMPT_TUNING


def soft_prompted(
    peft_model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask) for the base model, as PEFT's forward builds them: soft prompt, then tokens.

    The prompt is encoded once per row (PEFT encodes one row and repeats it): the same
    values, and each example's activations stay its own. The rows of token ids are a real
    (contiguous) copy, not a stride-0 view, which Opacus' embedding norm sampler (ghost
    clipping) could not ``view`` flat.
    """
    adapter = peft_model.active_adapter
    batch = input_ids.shape[0]
    tokens = peft_model.prompt_tokens[adapter].to(input_ids.device).unsqueeze(0).expand(batch, -1).contiguous()
    prompt = peft_model.prompt_encoder[adapter](tokens)
    embeds = peft_model.word_embeddings(input_ids)
    mask = torch.cat([attention_mask.new_ones(batch, prompt.shape[1]), attention_mask], dim=1)
    return torch.cat([prompt.to(embeds.dtype), embeds], dim=1), mask
