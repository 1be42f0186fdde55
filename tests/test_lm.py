"""fedsec_bench.lm: what every measurement relies on when it reads the model.

Per-example log-probs against a by-hand computation (the soft prompt's positions cut
under prompt tuning), the model's mode restored whatever happens, and batched greedy
decoding through ``generate`` equal to decoding each prompt alone, by hand, in every
tuning mode of a tiny GPT-2 and a tiny Llama.
"""

from __future__ import annotations

import copy

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from fedsec_bench import load_scenario
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.batching import Batcher
from fedsec_bench.lm import evaluating, example_logprobs, greedy_continuations, input_logits
from fedsec_bench.models import make_model, make_tokenizer
from fedsec_bench.tuning import apply_tuning

ARCHS = ["gpt2", "llama"]
MODES = ["full", "lora", "prompt"]
CPU = torch.device("cpu")
PROMPTS = ["the rain", "we saw the old man by the", "a", "in the morning the cat"]


def ids_of(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def tiny_model(tiny: dict, arch: str, mode: str):
    """(tuned model, tokenizer, held-out texts), weights drawn wide so that every position and
    every earlier token sways the argmax (a fresh tiny model repeats one token whatever it reads)."""
    raw = copy.deepcopy(tiny)
    raw["model"]["arch"] = arch
    raw["tuning"]["mode"] = mode
    scenario = load_scenario(raw)
    data = build_federated_data(scenario)
    tokenizer = make_tokenizer(scenario.model, data.public_texts())
    model = apply_tuning(make_model(scenario.model, tokenizer, scenario.seed), scenario.tuning)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the adapter too: PEFT starts LoRA's B at zero
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval(), tokenizer, data.heldout


def by_hand_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """One prompt alone, unpadded, no cache: append the argmax of the last position, up to EOS."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    new = []
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(input_logits(model, ids, torch.ones_like(ids))[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new


@pytest.mark.parametrize("mode", MODES)
def test_example_logprobs_are_the_log_softmax_of_each_text_alone(tiny, mode):
    """Padded batches give every text the log-probs it has alone; under prompt tuning the
    logits are those of the text's own positions after the soft prompt."""
    model, tokenizer, texts = tiny_model(tiny, "gpt2", mode)
    batcher = Batcher(tokenizer, seq_len=32, batch_size=4)
    scored = example_logprobs(model, batcher.loader(texts[:6]), CPU)
    for text, logprobs in zip(texts, scored):
        ids = torch.tensor([batcher.encode([text])[0].ids])
        with torch.no_grad():
            if mode == "prompt":  # the soft prompt's embeddings, then the text's: logits after the prompt
                prompt = model.get_prompt(batch_size=1)
                embeds = torch.cat([prompt, model.word_embeddings(ids)], dim=1)
                logits = model.get_base_model()(inputs_embeds=embeds).logits[:, prompt.shape[1] :]
            else:
                logits = model(input_ids=ids).logits
        expected = F.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert logprobs.shape == (ids.shape[1] - 1,)
        torch.testing.assert_close(torch.from_numpy(logprobs).float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_response_examples_are_scored_on_their_response_tokens_given_the_prompt(tiny, mode):
    """What every membership score and the canaries' perplexity read on instruction data: the
    log-probs of the response tokens (and EOS), conditioned on the rendered prompt, nothing of the prompt's own."""
    tiny["data"].update(format="instruction", seq_len=48)
    model, tokenizer, examples = tiny_model(tiny, "gpt2", mode)
    batcher = Batcher(tokenizer, seq_len=48, batch_size=4)
    scored = example_logprobs(model, batcher.loader(examples[:4]), CPU)
    for example, logprobs in zip(examples, scored):
        (encoded,) = batcher.encode([example])
        ids = torch.tensor([encoded.ids])
        full = example_logprobs(model, Batcher(tokenizer, 48, 1, train_on_prompt=True).loader([example]), CPU)[0]
        response_tokens = len(encoded.ids) - encoded.prompt_tokens
        assert encoded.prompt_tokens > 0 and logprobs.shape == (response_tokens,)
        np.testing.assert_allclose(logprobs, full[-response_tokens:], rtol=1e-6)
        assert ids[0, encoded.prompt_tokens:].tolist()[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluating_switches_dropout_off_and_restores_the_mode_even_on_error(was_training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train(was_training)
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(model):
            assert not model.training and not model[1].training
            raise RuntimeError("inside")
    assert model.training == was_training and model[1].training == was_training


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_batched_greedy_generation_equals_each_prompt_decoded_alone(tiny, arch, mode):
    """Left padding, the KV cache and the soft prompt change nothing: every row of one batch
    continues as its prompt does alone (the hand-made loop the attacks used before)."""
    model, tokenizer, _ = tiny_model(tiny, arch, mode)
    batched = greedy_continuations(model, tokenizer, ids_of(tokenizer, PROMPTS), 10, CPU)
    alone = [tokenizer.decode(by_hand_greedy(model, tokenizer, p, 10)) for p in PROMPTS]
    assert batched == alone
    assert len(set(alone)) == len(alone), "the check is void if every prompt continues alike"


@pytest.mark.parametrize("mode", ["full", "prompt"])
def test_each_prompt_stops_at_its_own_budget_and_at_the_first_eos(tiny, mode):
    """Per-prompt budgets, a stop token the model does emit, and a tokenizer without a pad token."""
    model, tokenizer, _ = tiny_model(tiny, "llama", mode)
    stop = by_hand_greedy(model, tokenizer, PROMPTS[1], 10)[3]  # one continuation's 4th token becomes EOS
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    tokenizer.pad_token = None
    assert tokenizer.eos_token_id == stop and tokenizer.pad_token_id is None
    budgets = [1, 10, 4, 7]
    alone = [by_hand_greedy(model, tokenizer, p, b) for p, b in zip(PROMPTS, budgets)]
    assert len(alone[1]) == 3  # stopped before the stop token
    assert greedy_continuations(model, tokenizer, ids_of(tokenizer, PROMPTS), budgets, CPU) == [tokenizer.decode(a) for a in alone]


def test_generation_leaves_a_training_model_training(tiny):
    model, tokenizer, _ = tiny_model(tiny, "gpt2", "prompt")
    model.train()
    greedy_continuations(model, tokenizer, ids_of(tokenizer, PROMPTS[:2]), 2, CPU)
    assert model.training
