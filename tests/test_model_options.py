"""model.dtype, quantization, gradient_checkpointing, trust_remote_code and federation.grad_accumulation
do what the schema promises: 16-bit frozen weights with float32 exchanged updates, a clear refusal
where bitsandbytes cannot run, the same gradients with less memory."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import pytest
import yaml

import fedsec_bench.models as models
from fedsec_bench import ScenarioError, load_scenario
from fedsec_bench.cli import main
from fedsec_bench.client import LocalTraining
from fedsec_bench.lm import greedy_new_tokens
from fedsec_bench.models import make_model, make_tokenizer
from fedsec_bench.scenario import ModelConfig
from fedsec_bench.tuning import TrainableState, apply_tuning

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "my card number is 4242"]
SEQ = 12


def build(raw, *overrides):
    """(scenario, tokenizer, model) of the tiny scenario; a BPE trained on TEXTS keeps the data layer out."""
    scenario = load_scenario(raw, list(overrides))
    tokenizer = make_tokenizer(scenario.model, TEXTS)
    return scenario, tokenizer, make_model(scenario.model, tokenizer, scenario.seed)


def saved(raw, folder):
    """A tiny built GPT-2 and its tokenizer saved to ``folder``, for the from_pretrained path."""
    _, tokenizer, model = build(raw, "model.dropout=0")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def batches(count: int, size: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Equal-length batches, no padding: every batch has the same number of tokens."""
    ids = torch.randint(0, vocab, (count * size, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk}
            for chunk in ids.split(size)]


def sgd(model) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["lora", "prompt"])
def test_a_16_bit_model_keeps_its_frozen_weights_16_bit_and_exchanges_float32(tiny, tmp_path, dtype, mode):
    """float16 runs on this CPU too (torch 2.13), so both dtypes load and train here."""
    tiny["model"] = {"name_or_path": saved(tiny, tmp_path / "tiny"), "dtype": dtype}
    tiny["tuning"]["mode"] = mode
    scenario, tokenizer, model = build(tiny)
    tuned = apply_tuning(model, scenario.tuning)
    trainable = TrainableState(tuned)
    frozen = [p for p in tuned.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == getattr(torch, dtype) for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainable.params.values())  # PEFT's autocast_adapter_dtype
    start = trainable.snapshot()
    loss = LocalTraining(tuned, sgd(tuned), batches(2, 2, len(tokenizer)), steps=2, device=torch.device("cpu")).run()
    update = trainable.delta_from(start)
    assert torch.isfinite(torch.tensor(loss))
    assert all(t.dtype == torch.float32 for t in [*start.values(), *update.values()])
    assert any(t.abs().sum() > 0 for t in update.values())  # the steps moved the exchanged parameters


def test_exchanged_states_are_float32_and_the_server_step_casts_back_to_the_parameters_dtype():
    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
    trainable = TrainableState(layer)
    start = trainable.snapshot()
    with torch.no_grad():
        layer.weight += 0.25
    update = trainable.delta_from(start)
    assert all(t.dtype == torch.float32 for t in [*start.values(), *update.values()])
    trainable.step(start, {n: 2 * u for n, u in update.items()}, scale=0.5)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.weight.equal((start["weight"] + update["weight"]).to(torch.bfloat16))
    trainable.load(start)
    assert layer.weight.equal(start["weight"].to(torch.bfloat16))


def test_a_built_model_is_cast_to_model_dtype_after_its_seeded_init(tiny):
    _, _, full = build(tiny)
    _, _, half = build(tiny, "model.dtype=bfloat16")
    for (name, a), (_, b) in zip(full.state_dict().items(), half.state_dict().items()):
        assert b.dtype == torch.bfloat16 and b.equal(a.to(torch.bfloat16)), name


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_quantization_without_a_cuda_gpu_is_refused_with_exit_2_before_any_run(
    tiny, tmp_path, capsys, monkeypatch, bits, command
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal, whatever this machine has
    tiny["model"] = {"name_or_path": str(tmp_path / "some-checkpoint"), "quantization": bits}
    tiny["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / "runs")}
    path = tmp_path / "quantized.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main([command, str(path), "--quiet"] if command == "run" else [command, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: model.quantization: {bits} needs a CUDA GPU and bitsandbytes" in err
    assert "no CUDA GPU" in err and "use model.quantization none on this machine" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # no run was opened


def test_quantized_loads_ask_bitsandbytes_for_qlora_and_leave_checkpointing_to_the_scenario(tiny, monkeypatch):
    """4bit is NF4 with double quantization, computing in bfloat16 for a float32 model and in the model's dtype
    otherwise; PEFT's k-bit preparation must not switch gradient checkpointing on by itself."""
    _, tokenizer, tiny_model = build(tiny)
    loads, prepared = [], []
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: loads.append(kw) or tiny_model)
    monkeypatch.setattr(models, "prepare_model_for_kbit_training", lambda m, **kw: prepared.append(kw) or m)
    # the options as given: older transformers' BitsAndBytesConfig looks bitsandbytes up, absent on CPU machines
    monkeypatch.setattr(models, "BitsAndBytesConfig", lambda **kw: SimpleNamespace(**kw))
    for dtype, compute in [("float32", torch.bfloat16), ("float16", torch.float16)]:
        make_model(ModelConfig(name_or_path="ckpt", quantization="4bit", dtype=dtype), tokenizer, seed=0)
        quant = loads[-1]["quantization_config"]
        assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
        assert quant.bnb_4bit_compute_dtype == compute and loads[-1]["dtype"] == getattr(torch, dtype)
    make_model(ModelConfig(name_or_path="ckpt", quantization="8bit"), tokenizer, seed=0)
    assert loads[-1]["quantization_config"].load_in_8bit
    assert prepared == [{"use_gradient_checkpointing": False}] * 3
    assert not tiny_model.is_gradient_checkpointing


def test_quantization_support_is_checked_from_the_machine_and_pretraining_is_refused(monkeypatch):
    config = ModelConfig(name_or_path="ckpt", quantization="4bit")
    models.check_model_support(ModelConfig(arch="gpt2"))  # nothing to check without quantization
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    models.check_model_support(config)  # a CUDA GPU and bitsandbytes: supported
    with pytest.raises(ScenarioError, match="model.pretrain.steps: pretraining trains every weight"):
        models.check_model_support(ModelConfig(name_or_path="ckpt", quantization="4bit", pretrain={"steps": 5}))


def test_trust_remote_code_is_off_by_default_and_passed_to_both_loaders(tiny, tmp_path, monkeypatch):
    folder = saved(tiny, tmp_path / "tiny")
    seen = []
    for loader in (models.AutoModelForCausalLM, models.AutoTokenizer):
        real = loader.from_pretrained
        monkeypatch.setattr(loader, "from_pretrained", lambda path, _real=real, **kw: seen.append(kw) or _real(path, **kw))
    assert ModelConfig(name_or_path=folder).trust_remote_code is False
    for trusted in (False, True):
        config = ModelConfig(name_or_path=folder, trust_remote_code=trusted)
        make_model(config, make_tokenizer(config, TEXTS), seed=0)
    assert [kw["trust_remote_code"] for kw in seen] == [False, False, True, True]  # tokenizer, then model


def mlp_calls(model: torch.nn.Module, arch: str) -> list[int]:
    """The sequence length of each call of the first block's MLP: a training step calls it twice when its
    activations are recomputed; a cached decoding step feeds it one new token."""
    mlp = (model.transformer.h[0] if arch == "gpt2" else model.model.layers[0]).mlp
    calls, forward = [], mlp.forward
    mlp.forward = lambda hidden, *a, **kw: calls.append(hidden.shape[1]) or forward(hidden, *a, **kw)
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients_and_generation(tiny, arch):
    """Checkpointing recomputes each block in the backward pass, with the same gradients (dropout 0), and
    greedy generation still decodes with the KV cache and gives the same tokens."""
    grads, generated = [], []
    for checkpointing in (False, True):
        scenario, tokenizer, model = build(tiny, f"model.arch={arch}", "model.dropout=0",
                                           f"model.gradient_checkpointing={checkpointing}")
        tuned = apply_tuning(model, scenario.tuning).train()
        calls = mlp_calls(model, arch)
        [batch] = batches(1, 4, len(tokenizer))
        tuned(**batch).loss.backward()
        assert calls == [SEQ] * (2 if checkpointing else 1)
        assert model.is_gradient_checkpointing is checkpointing and model.config.use_cache is not checkpointing
        grads.append({n: p.grad for n, p in tuned.named_parameters() if p.requires_grad})
        calls.clear()
        ids = batch["input_ids"][:2, :4]
        generated.append(greedy_new_tokens(tuned.eval(), ids, torch.ones_like(ids), 6, tokenizer.pad_token_id, None))
        assert calls == [4] + [1] * 5  # the prompt, then one token per step: the KV cache is used
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    assert generated[1].equal(generated[0]) and generated[0].shape == (2, 6)


def test_grad_accumulation_of_2_batches_is_one_step_on_their_union(tiny):
    """With SGD, 2 accumulated batches of b give the update of 1 batch of 2b (equal token counts, so the
    token means agree), and the reported loss is the mean batch loss either way."""
    scenario, tokenizer, model = build(tiny, "model.dropout=0")
    tuned = apply_tuning(model, scenario.tuning)
    trainable = TrainableState(tuned)
    start = trainable.snapshot()
    small, large = batches(4, 2, len(tokenizer)), batches(2, 4, len(tokenizer))
    runs = []
    for loader, accumulation in [(small, 2), (large, 1)]:
        trainable.load(start)
        loss = LocalTraining(tuned, sgd(tuned), loader, steps=2, device=torch.device("cpu"),
                             accumulation=accumulation).run()
        runs.append((loss, trainable.delta_from(start)))
    (loss_small, update_small), (loss_large, update_large) = runs
    assert loss_small == pytest.approx(loss_large, rel=1e-5)
    for name, value in update_large.items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(update_small[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_dp_sgd_refuses_grad_accumulation(tiny):
    tiny["defenses"] = [{"name": "dp_sgd", "noise_multiplier": 1.0}]
    with pytest.raises(ScenarioError) as caught:
        load_scenario(tiny, ["federation.grad_accumulation=2"])
    assert caught.value.problems[0].startswith("defenses[0] (dp_sgd): federation.grad_accumulation > 1 is not supported")


# --------------------------------------------------------------------------- loading failures are ScenarioErrors


def test_a_checkpoint_shorter_than_the_sequences_is_refused_by_check_model_fits(tiny, tmp_path):
    from fedsec_bench.models import check_model_fits

    tiny["model"]["max_positions"] = 24
    tiny["data"]["seq_len"] = 16
    folder = saved(tiny, tmp_path / "short")
    loaded = {**tiny, "model": {"name_or_path": folder}}
    scenario, _, model = build(loaded, "data.seq_len=24")
    check_model_fits(model, scenario)  # exactly its positions
    scenario = load_scenario(loaded, ["data.seq_len=32"])
    with pytest.raises(ScenarioError, match=r"^data.seq_len: 32 exceeds the 24 positions of the checkpoint"):
        check_model_fits(model, scenario)
    scenario = load_scenario(loaded, ["data.seq_len=20", "tuning.mode=prompt", "tuning.prompt.num_virtual_tokens=8"])
    with pytest.raises(ScenarioError, match=r"num_virtual_tokens \(8\) exceeds .*at most 16$"):
        check_model_fits(model, scenario)


@pytest.mark.parametrize("name, problem", [
    ("/nonexistent/model", "model.name_or_path: '/nonexistent/model' does not exist"),
    ("nobody-here/no-such-model", "model.name_or_path: 'nobody-here/no-such-model' is neither a local folder nor in "
     "the Hugging Face cache, and the Hub"),
])
def test_a_missing_checkpoint_fails_in_seconds_with_the_field_named(tiny, name, problem, monkeypatch):
    """No network here: huggingface_hub would retry each file five times (about 25 s) before failing."""
    import fedsec_bench.hub as hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)  # as offline CI is, whatever this machine has
    tiny["model"] = {"name_or_path": name}
    started = time.perf_counter()
    with pytest.raises(ScenarioError) as info:
        build(tiny)
    assert time.perf_counter() - started < 5
    assert info.value.problems[0].startswith(problem)


def test_a_folder_without_tokenizer_files_is_refused_not_read_as_an_empty_tokenizer(tiny, tmp_path):
    _, _, model = build(tiny)
    model.save_pretrained(tmp_path / "weights-only")
    tiny["model"] = {"name_or_path": str(tmp_path / "weights-only")}
    with pytest.raises(ScenarioError, match=r"^model.name_or_path: the tokenizer of .* holds no tokenizer files"):
        build(tiny)


def test_unknown_lora_target_modules_are_refused_with_the_models_own_layer_names(tiny):
    scenario, _, model = build(tiny, "tuning.lora.target_modules=[q_proj, nope]")
    with pytest.raises(ScenarioError) as info:
        apply_tuning(model, scenario.tuning)
    [problem] = info.value.problems
    assert problem.startswith("tuning.lora.target_modules: PEFT refused them")
    assert problem.endswith("name some of this model's layers: c_attn, c_fc, c_proj, lm_head, wpe, wte")


def test_a_built_vocabulary_below_the_tokenizers_is_refused(tiny):
    with pytest.raises(ScenarioError, match=r"^model.vocab: 100 is below the tokenizer's"):
        build(tiny, "model.vocab=100", "model.tokenizer.kind=byte")
