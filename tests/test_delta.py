"""storage="delta": trained values beside frozen (possibly quantized) weights, exact against in-place SIFT."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import CheckpointError, ConfigError, ReferenceSift, SiftConfig  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss, tiny_llama, token_batches  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")


def _config(**overrides) -> SiftConfig:
    return SiftConfig(**{"density": 0.2, "target_modules": MLP_TARGETS, "dense_modules": MLP_DENSE, **overrides})


def _lockstep(overrides: dict, steps: int = 8, accum: int = 1, dtype=torch.float32):
    """Train one MLP with storage="delta", one with ReferenceSift (in place), on the same batches.

    Returns the largest output difference over the steps and the two models.
    """
    base = mlp(dtype=dtype)
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, _config(storage="delta", **overrides))
    optimizer = engine.optimizer(lr=1e-2)
    reference = ReferenceSift(slow, _config(**overrides), lr=1e-2)
    batches = iter(mlp_batches(steps * accum, dtype=dtype))
    worst = 0.0
    for _ in range(steps):
        for _ in range(accum):
            batch = next(batches)
            mlp_loss(fast, batch).backward()
            mlp_loss(slow, batch).backward()
            reference.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.step()
        with torch.no_grad():
            worst = max(worst, float((fast(batch[0]) - slow(batch[0])).abs().max()))
    return worst, base, fast, slow, engine, optimizer


@pytest.mark.parametrize("overrides, accum", [
    ({}, 1),
    ({"mode": "periodic", "refresh_every": 3}, 1),
    ({}, 3),
    ({"selection_batches": 3}, 2),
    ({"selection_batches": 2}, 2),  # the window ends at a step's second micro-batch
    ({"selection_batches": 2, "mode": "periodic", "refresh_every": 2}, 3),
    ({"max_grad_norm": 0.05}, 1),
    ({"selection": "random"}, 1),
    ({"update_in_backward": True}, 1),
    ({"compact_indices": True}, 2),
    ({"compact_indices": True, "mode": "periodic", "refresh_every": 3}, 1),
    # The selection options (siftune.core.budget): the delta's weight is base plus delta, its counts uneven.
    ({"score": "grad_weight", "mode": "periodic", "refresh_every": 3}, 2),
    ({"score": "grad_squared", "selection_batches": 3}, 2),
    ({"score": "grad_snr", "selection_batches": 3}, 2),
    ({"budget": "global", "min_density": 0.02, "mode": "periodic", "refresh_every": 3}, 1),
    ({"budget": "global", "compact_indices": True}, 2),
    ({"select_after": 3}, 2),  # the head trains alone first
    ({"select_after": 2, "mode": "periodic", "refresh_every": 3}, 1),
])
def test_delta_on_an_fp32_base_equals_in_place_sift_step_for_step(overrides, accum):
    worst, base, fast, slow, _, _ = _lockstep(overrides, accum=accum)
    assert worst < 1e-5
    assert not torch.equal(slow[0].weight, base[0].weight)  # the comparison trained something


@pytest.mark.parametrize("compact", [False, True])
def test_sparse_and_dense_delta_kernels_train_the_same_model(monkeypatch, compact):
    """On a CPU in fp32 the delta's products run as CSR kernels; the dense transient must agree."""
    overrides = {"mode": "periodic", "refresh_every": 3, "compact_indices": compact}
    sparse = _lockstep(overrides)
    monkeypatch.setattr(siftune.core.storage.Delta, "sparse_kernels", lambda self, dtype: False)
    dense = _lockstep(overrides)
    x = mlp_batches(1, seed=5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(sparse[2](x), dense[2](x), atol=1e-6, rtol=1e-5)
    assert sparse[0] < 1e-5 and dense[0] < 1e-5


def test_delta_on_gpt2_conv1d_equals_in_place_sift():
    """Conv1D keeps its weight transposed; the delta's indices follow the weight's own layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, density=0.05, storage="delta")
    optimizer = engine.optimizer(lr=1e-2)
    reference = ReferenceSift(slow, SiftConfig(density=0.05), lr=1e-2)
    for ids in token_batches(3):
        fast(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        slow(input_ids=ids, labels=ids).loss.backward()
        reference.after_backward()
        reference.step()
    ids = token_batches(1, seed=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, slow(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(slow.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def test_delta_leaves_the_targeted_weights_bit_identical_and_the_state_dict_unchanged():
    _, base, fast, _, engine, _ = _lockstep({})
    assert fast.state_dict().keys() == base.state_dict().keys()
    for name in ("0.weight", "2.weight", "0.bias"):
        assert torch.equal(fast.state_dict()[name], base.state_dict()[name])
    engine.detach()
    x = mlp_batches(1)[0][0]
    torch.testing.assert_close(fast[:4](x), base[:4](x))  # hooks gone: the base layers alone


def test_delta_on_a_bf16_base_equals_in_place_sift_to_bf16_rounding():
    worst, *_ = _lockstep({}, dtype=torch.bfloat16)
    assert worst < 2e-2


def test_bf16_delta_values_on_an_fp32_cpu_base_train_without_sparse_kernels():
    # torch has no bf16 CSR product on a CPU: bf16 values take the dense transient.
    worst, *_ = _lockstep({"delta_dtype": "bfloat16"})
    assert worst < 2e-2


def test_a_fake_tensor_standing_for_a_plain_weight_is_not_quantized():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from siftune.core.storage import quantized_kind

    with FakeTensorMode():
        assert quantized_kind(nn.Parameter(torch.empty(4, 4))) is None
        assert quantized_kind(nn.Parameter(torch.empty(8, 1, dtype=torch.uint8), requires_grad=False)) == "torch.uint8"


def test_delta_increment_applied_to_the_base_gives_the_trained_model():
    _, base, fast, slow, engine, optimizer = _lockstep({"mode": "periodic", "refresh_every": 3})
    increment = engine.increment(values=optimizer.master_values())
    merged = copy.deepcopy(base)
    increment.apply(merged)
    x = mlp_batches(1, seed=9)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), fast(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(x), slow(x), atol=1e-5, rtol=1e-5)


def test_delta_state_per_selected_component_is_index_value_and_adam_moments():
    _, _, _, _, engine, optimizer = _lockstep({}, steps=2)
    held = engine.state_bytes(optimizer)
    selected = engine.num_selected
    assert held["indices"] == 4 * selected and held["values"] == 4 * selected
    assert held["optimizer"] == 8 * selected  # two fp32 moments; no master copy: the values are fp32


def test_compact_indices_keep_one_packed_copy_of_a_fixed_selection():
    _, _, _, _, engine, optimizer = _lockstep({"compact_indices": True}, steps=2)
    held = engine.state_bytes(optimizer)
    packed = sum(s.idx.numel() * 2 for s in engine.slots)  # 2 bytes a component plus 4 a 65,536-entry block
    assert held["indices"] == packed < 2 * engine.num_selected + 4 * len(engine.slots) + 1
    for slot in engine.slots:
        assert slot.idx.dtype == torch.int16 and slot.storage.stored is slot.idx  # shared, not copied
        assert torch.equal(slot.storage.indices, slot.flat())


def test_compact_indices_in_periodic_mode_count_the_delta_s_own_packed_indices():
    _, _, _, _, engine, optimizer = _lockstep({"compact_indices": True, "mode": "periodic", "refresh_every": 3})
    grown = [s for s in engine.slots if s.storage.count > s.k]
    assert grown  # a refresh added components, which the delta keeps beside the current selection
    held = engine.state_bytes(optimizer)
    assert held["indices"] == sum(2 * s.idx.numel() for s in engine.slots) + sum(2 * s.storage.stored.numel()
                                                                                for s in grown)
    assert all(s.storage.stored.dtype == torch.int16 for s in engine.slots)


@pytest.mark.parametrize("compact", [False, True])
def test_delta_checkpoint_restores_the_values_and_training_continues_identically(compact):
    batches = mlp_batches(6)
    settings = dict(storage="delta", mode="periodic", refresh_every=2, compact_indices=compact)

    def run(restart_at=None):
        model = mlp()
        engine = siftune.attach(model, _config(**settings))
        optimizer = engine.optimizer(lr=1e-2)
        for i, batch in enumerate(batches):
            if i == restart_at:
                engine_state = copy.deepcopy(engine.state_dict())
                optim_state = copy.deepcopy(optimizer.state_dict())
                dense = copy.deepcopy(model.state_dict())
                model = mlp()
                model.load_state_dict(dense)
                engine = siftune.attach(model, _config(**settings))
                optimizer = engine.optimizer(lr=1e-2)
                engine.load_state_dict(engine_state)
                optimizer.load_state_dict(optim_state)
            mlp_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            return model(batches[0][0])

    torch.testing.assert_close(run(restart_at=3), run(), atol=0, rtol=0)


def test_delta_checkpoint_of_an_in_place_run_is_refused():
    model = mlp()
    engine = siftune.attach(model, _config())
    optimizer = engine.optimizer(lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    optimizer.step()
    optimizer.zero_grad()
    state = engine.state_dict()
    state["config"]["storage"] = "delta"
    other = siftune.attach(mlp(), _config(storage="delta"))
    with pytest.raises(CheckpointError, match="delta"):
        other.load_state_dict(state)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_delta_with_gradient_checkpointing_gives_the_same_model(use_reentrant):
    def train(checkpointing):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        engine = siftune.attach(model, density=0.05, storage="delta")
        optimizer = engine.optimizer(lr=1e-2)
        for ids in token_batches(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return engine.increment()

    plain, checkpointed = train(False), train(True)
    assert plain.tensors.keys() == checkpointed.tensors.keys()
    for name, delta in plain.tensors.items():
        assert torch.equal(delta.indices, checkpointed.tensors[name].indices)
        torch.testing.assert_close(delta.values, checkpointed.tensors[name].values, atol=1e-6, rtol=1e-5)
    assert any(bool(d.values.abs().max() > 0) for d in plain.tensors.values())


def test_in_place_storage_on_a_quantized_weight_is_a_config_error_naming_delta():
    layer = bnb.nn.Linear4bit(16, 8, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(8, 16), requires_grad=False, quant_type="nf4").to("cpu")
    model = nn.Sequential(layer)
    with pytest.raises(ConfigError, match="storage='delta'"):
        siftune.attach(model, density=0.1, target_modules=["0"])


@pytest.mark.parametrize("overrides", [{"mode": "per_step"}, {"delta_dtype": "int8"}])
def test_delta_refuses_what_it_cannot_do(overrides):
    with pytest.raises(ConfigError):
        SiftConfig(storage="delta", **overrides)


def test_delta_on_an_embedding_is_a_config_error_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="Linear-like"):
        siftune.attach(model, density=0.1, storage="delta", target_modules=["embed_tokens", "q_proj"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# -- quantized bases (bitsandbytes on the CPU) ---------------------------------------------------

@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A random Llama saved as a transformers folder; hidden 64 (bitsandbytes' 4-bit block size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder


def _quantized(folder, kind):
    from transformers import AutoModelForCausalLM

    from siftune.core.quantize import quantization_config

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config(kind),
                                                 device_map="cpu")
    return model.train()  # bitsandbytes' exact path: its eval-mode CPU kernel computes in bf16


def _dequantized_twin(folder, quantized):
    """The fp32 model whose targeted weights are the quantized model's, dequantized once."""
    from transformers import AutoModelForCausalLM

    from siftune.core.quantize import dequantized_weight

    dense = AutoModelForCausalLM.from_pretrained(folder)
    for name, module in quantized.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            dense.get_submodule(name).weight.data = dequantized_weight(module).float()
    return dense.train()


@pytest.mark.parametrize("kind, tolerance, options", [
    ("nf4", 1e-6, {}), ("fp4", 1e-6, {}), ("int8", 2e-2, {}),
    # |g * w| ranks by the dequantized base plus the delta trained so far (a refresh after step 2)
    ("nf4", 1e-6, {"score": "grad_weight"}),
])
def test_delta_on_a_quantized_base_equals_training_the_dequantized_weights(llama_folder, kind, tolerance, options):
    """int8 is held to a loose tolerance: LLM.int8() also rounds the activations to int8."""
    quantized = _quantized(llama_folder, kind)
    dense = _dequantized_twin(llama_folder, quantized)
    engine = siftune.attach(quantized, density=0.05, storage="delta", mode="periodic", refresh_every=2, **options)
    optimizer = engine.optimizer(lr=1e-2)
    reference = ReferenceSift(dense, SiftConfig(density=0.05, mode="periodic", refresh_every=2, **options), lr=1e-2)
    losses = []
    for ids in token_batches(5):
        fast = quantized(input_ids=ids, labels=ids).loss
        fast.backward()
        optimizer.step()
        optimizer.zero_grad()
        slow = dense(input_ids=ids, labels=ids).loss
        slow.backward()
        reference.after_backward()
        reference.step()
        losses.append((fast.item(), slow.item()))
    assert max(abs(a - b) for a, b in losses) <= tolerance, losses
    assert losses[-1][0] != losses[0][0]
    if kind != "int8":
        for name, idx in engine.selected.items():
            assert torch.equal(reference.mask[name].reshape(-1).nonzero().squeeze(1).to(idx.dtype), idx)


def test_a_quantized_increment_applies_to_an_unquantized_copy_of_the_base(llama_folder):
    from transformers import AutoModelForCausalLM

    quantized = _quantized(llama_folder, "nf4")
    dense = _dequantized_twin(llama_folder, quantized)
    engine = siftune.attach(quantized, density=0.05, storage="delta")
    optimizer = engine.optimizer(lr=1e-2)
    for ids in token_batches(3):
        quantized(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    increment = engine.increment(base_model=str(llama_folder))
    assert increment.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    increment.apply(dense)  # the dequantized base: the trained model exactly
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, quantized(input_ids=ids).logits)
    original = AutoModelForCausalLM.from_pretrained(llama_folder)
    increment.apply(original)  # the unquantized base: the increment lands where it was trained
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = increment.tensors[name]
    changed = (original.get_parameter(name).detach().reshape(-1)
               - AutoModelForCausalLM.from_pretrained(llama_folder).get_parameter(name).detach().reshape(-1))
    torch.testing.assert_close(changed[delta.indices.long()], delta.values)


def test_the_trainer_trains_a_delta_on_an_nf4_base_with_accumulation_and_saves_its_increment(llama_folder, tmp_path):
    from transformers import TrainingArguments, default_data_collator

    from siftune import SparseIncrement
    from siftune.trainer import Trainer

    rows = [{"input_ids": ids, "labels": ids} for ids in token_batches(16, batch_size=1, length=8)[:16]]
    rows = [{k: v[0] for k, v in row.items()} for row in rows]
    model = _quantized(llama_folder, "nf4")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=4, learning_rate=1e-2, max_grad_norm=1.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      sift_config=SiftConfig(density=0.05, storage="delta"))
    batch = default_data_collator(rows)
    with torch.no_grad():
        before = float(model(**batch).loss)
    trainer.train()
    model.train()
    with torch.no_grad():
        after = float(model(**batch).loss)
    assert trainer.sift.steps == 4 * 16 // (4 * 2)
    assert after < before - 0.05, (before, after)
    trainer.save_model(str(tmp_path / "increment"))
    saved = SparseIncrement.load(tmp_path / "increment")
    assert saved.config["storage"] == "delta"
    assert len(saved.tensors) == 14


def test_delta_on_a_torchao_int8_weight_equals_training_the_dequantized_weights():
    torchao = pytest.importorskip("torchao.quantization")
    base = mlp()
    quantized = copy.deepcopy(base)
    torchao.quantize_(quantized, torchao.Int8WeightOnlyConfig())
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("0", "2", "4"):
            dense.get_submodule(name).weight.copy_(quantized.get_submodule(name).weight.dequantize())
    engine = siftune.attach(quantized, _config(storage="delta", dense_modules=[], target_modules=["0", "2", "4"]))
    optimizer = engine.optimizer(lr=1e-2)
    reference = ReferenceSift(dense, _config(dense_modules=[], target_modules=["0", "2", "4"]), lr=1e-2)
    for batch in mlp_batches(5):
        mlp_loss(quantized, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        mlp_loss(dense, batch).backward()
        reference.after_backward()
        reference.step()
    x = mlp_batches(1, seed=6)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), dense(x), atol=1e-5, rtol=1e-5)
    assert type(quantized[0].weight).__name__ == "Int8Tensor"
