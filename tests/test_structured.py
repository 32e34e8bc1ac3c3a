"""structure="rows" / "columns": whole slices selected, only their gradient computed, exact against the reference."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import CheckpointError, ConfigError, ReferenceSift, SiftConfig, SparseIncrement  # noqa: E402
from _models import (MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss, tiny_llama, token_batches,  # noqa: E402
                     whole_and_resumed)

STRUCTURES = ["rows", "columns"]
ATOL = 1e-5  # the slice's product sums in another order than the dense one: float rounding over 8 steps


def config(**overrides) -> SiftConfig:
    return SiftConfig(**{"density": 0.2, "target_modules": MLP_TARGETS, "dense_modules": MLP_DENSE, **overrides})


def lockstep(overrides: dict, steps: int = 8, accum: int = 2, weight_decay: float = 0.0):
    """The MLP trained by the engine and by ReferenceSift (dense, masked) on the same batches.

    Returns the largest difference of what the two models compute (and, in
    place, of their parameters) over the steps, the engine and both models.
    """
    base = mlp()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, config(**overrides))
    optimizer = engine.optimizer(lr=1e-2, weight_decay=weight_decay)
    reference = ReferenceSift(slow, config(**{k: v for k, v in overrides.items() if k != "storage"}), lr=1e-2,
                              weight_decay=weight_decay)
    batches = iter(mlp_batches(steps * accum))
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
            if engine.config.storage == "in_place":
                worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(fast.parameters(),
                                                                                     slow.parameters())))
    return worst, engine, base, fast, slow


def whole_lines(idx: torch.Tensor, shape, structure: str) -> bool:
    """Whether the flat indices ``idx`` are exactly some whole rows (columns) of a ``shape`` weight."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[idx.long()] = True
    mask = mask.view(shape)
    lines = mask.any(dim=1 if structure == "rows" else 0)
    expected = lines[:, None].expand(shape) if structure == "rows" else lines[None, :].expand(shape)
    return bool(torch.equal(mask, expected))


# -- exact against the reference --------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("overrides, accum", [
    ({}, 2),
    ({}, 3),
    ({"mode": "periodic", "refresh_every": 3}, 2),
    ({"selection": "random", "seed": 7}, 2),
    ({"score": "grad"}, 2),
    ({"score": "grad_squared", "selection_batches": 3}, 2),
    ({"score": "grad_snr", "selection_batches": 3}, 2),
    ({"max_grad_norm": 0.05}, 2),
    ({"update_in_backward": True}, 1),
    ({"compact_indices": True, "mode": "periodic", "refresh_every": 3}, 2),
    ({"state_dtype": "bfloat16"}, 2),
])
def test_structured_engine_matches_the_reference_with_a_line_mask(structure, overrides, accum):
    worst, engine, base, fast, _ = lockstep({"structure": structure, **overrides}, accum=accum)
    assert worst <= ATOL
    for slot in engine.slots:
        assert whole_lines(slot.flat(), slot.shape, structure), slot.name
        assert not torch.equal(fast.get_parameter(slot.name), base.get_parameter(slot.name)), slot.name


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("overrides, accum", [({}, 2), ({"mode": "periodic", "refresh_every": 3}, 2),
                                              ({"update_in_backward": True}, 1)])
def test_structured_delta_equals_the_reference(structure, overrides, accum):
    worst, engine, base, fast, _ = lockstep({"structure": structure, "storage": "delta", **overrides}, accum=accum)
    assert worst <= ATOL
    for name, p in fast.named_parameters():  # the weights stay as they were; the values sit beside them
        assert torch.equal(p, base.get_parameter(name)) or name.startswith("4."), name


def test_reference_with_weight_decay_is_matched():
    worst, *_ = lockstep({"structure": "rows"}, weight_decay=0.1)
    assert worst <= ATOL


@pytest.mark.parametrize("structure", STRUCTURES)
def test_selection_is_the_lines_whose_summed_score_is_largest(structure):
    model = mlp()
    probe = copy.deepcopy(model)  # trains densely: its gradient is the whole one
    engine = siftune.attach(model, config(structure=structure, score="grad"))
    batch = mlp_batches(1)[0]
    mlp_loss(probe, batch).backward()
    mlp_loss(model, batch).backward()
    out, inp = probe[2].weight.shape
    sums = probe[2].weight.grad.abs().sum(dim=1 if structure == "rows" else 0)
    idx = engine.selected["2.weight"].long()
    count = idx.numel() // (inp if structure == "rows" else out)
    chosen = idx[::inp] // inp if structure == "rows" else idx[:count] % inp
    assert count >= 2 and set(chosen.tolist()) == set(torch.topk(sums, count).indices.tolist())


@pytest.mark.parametrize("structure, shape, density, lines", [
    ("rows", (16, 8), 0.2, 3),  # 25.6 -> 26 components -> 3.25 rows
    ("columns", (16, 8), 0.2, 2),  # 26 / 16 -> 1.6 columns
    ("rows", (16, 8), 0.001, 1),  # at least one line
    ("columns", (16, 8), 1.0, 8),
])
def test_the_count_is_rounded_to_whole_lines(structure, shape, density, lines):
    from siftune.core.structured import line_length, selected_count

    assert selected_count(shape, density, structure) == lines * line_length(shape, structure)


# -- only the slice's gradient is computed --------------------------------------------------------


class _ProductShapes(TorchDispatchMode):
    """Records the output shapes of every matrix product run under it."""

    PRODUCTS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.matmul.default"}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in self.PRODUCTS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("structure, storage", [("rows", "in_place"), ("columns", "in_place"), ("rows", "delta"),
                                                ("columns", "delta")])
def test_backward_never_forms_a_dense_weight_gradient_once_selected(structure, storage):
    model = mlp(sizes=(8, 24, 40, 3))  # weights (24, 8) and (40, 24): no activation has their shapes
    engine = siftune.attach(model, config(structure=structure, storage=storage))
    optimizer = engine.optimizer(lr=1e-2)
    batches = mlp_batches(3, batch_size=6)
    mlp_loss(model, batches[0]).backward()  # selects: the dense gradient once
    optimizer.step()
    optimizer.zero_grad()
    for batch in batches[1:]:
        loss = mlp_loss(model, batch)
        with _ProductShapes() as products:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert (24, 8) not in products.shapes and (40, 24) not in products.shapes, products.shapes
        # 38 and 192 components: 5 and 8 whole rows (x in), or 2 and 5 whole columns (out x)
        slices = {(5, 8), (8, 24)} if structure == "rows" else {(24, 2), (40, 5)}
        assert slices <= set(products.shapes), products.shapes
    for slot in engine.slots:
        assert not model.get_parameter(slot.name).requires_grad and model.get_parameter(slot.name).grad is None


@pytest.mark.parametrize("storage", ["in_place", "delta"])
def test_columns_keep_only_the_selected_columns_of_the_input_for_the_backward_once_selected(storage):
    model = mlp(sizes=(8, 24, 40, 3))  # the first layer's input (6, 8) is kept by nothing else
    engine = siftune.attach(model, config(structure="columns", storage=storage))
    optimizer = engine.optimizer(lr=1e-2)
    first, second = mlp_batches(2, batch_size=6)
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = mlp_loss(model, first)
    assert (6, 8) in kept  # selecting: the whole input, for the dense gradient
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = mlp_loss(model, second)
    # 2 and 5 whole columns selected (see above): their inputs, not the layers' whole inputs
    assert (6, 8) not in kept and {(6, 2), (6, 5)} <= set(kept), kept
    loss.backward()


# -- training setups -------------------------------------------------------------------------------

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.mark.parametrize("storage", ["in_place", "delta"])
def test_rows_keep_what_a_product_is_formed_from_not_the_product_and_match_the_reference(storage):
    """Rows need their layer's whole input. down_proj's, act(gate(x)) * up(x), and q/v's, an RMSNorm's
    weight * (h * rsqrt(mean(h²) + eps)), are products of tensors autograd keeps anyway for the products'
    own backward: those are kept, the input is formed again in the backward, and the weights match the
    reference."""
    base = tiny_llama()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    fast.train(), slow.train()
    cfg = dict(density=0.1, target_modules=LLAMA_TARGETS, structure="rows")
    engine = siftune.attach(fast, SiftConfig(**cfg, storage=storage))
    optimizer = engine.optimizer(lr=1e-2)
    reference = ReferenceSift(slow, SiftConfig(**cfg), lr=1e-2)
    products, kept = [], []

    def product(module, args):
        if args[0].grad_fn is not None:  # the first layer's q_proj input is none: nothing before it trains
            products.append(args[0])

    for name, module in fast.named_modules():
        if name.endswith(("down_proj", "q_proj")):
            module.register_forward_pre_hook(product)

    def pack(t):
        kept.append(t)  # held, as the products are, so that no address is reused within the forward
        return t

    for step, ids in enumerate(token_batches(4)):
        products.clear(), kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fast(input_ids=ids, labels=ids).loss
        # selecting (step 0): the dense gradient needs the product itself; once selected, its factors do
        saved = {t.data_ptr() for t in kept}
        assert len(products) == 3 and {t.data_ptr() for t in products} <= saved if step == 0 else not any(
            t.data_ptr() in saved for t in products), step
        loss.backward()
        slow(input_ids=ids, labels=ids).loss.backward()
        reference.after_backward()
        optimizer.step(), reference.step()
        optimizer.zero_grad()
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, slow(input_ids=ids).logits, atol=ATOL, rtol=0)
        assert not torch.equal(fast(input_ids=ids).logits, base(input_ids=ids).logits)


def _train_llama(model, steps: int = 3, **overrides):
    model.train()
    engine = siftune.attach(model, SiftConfig(density=0.1, target_modules=LLAMA_TARGETS, **overrides))
    optimizer = engine.optimizer(lr=1e-2)
    for ids in token_batches(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return engine


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("structure, storage", [("rows", "in_place"), ("columns", "in_place"), ("columns", "delta")])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_weights(structure, storage, use_reentrant):
    base = tiny_llama()
    plain, checkpointed = copy.deepcopy(base), copy.deepcopy(base)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        checkpointed.enable_input_require_grads()
    engine = _train_llama(plain, structure=structure, storage=storage)
    other = _train_llama(checkpointed, structure=structure, storage=storage)
    for slot, twin in zip(engine.slots, other.slots):
        assert torch.equal(slot.flat(), twin.flat()), slot.name
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, checkpointed(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert not torch.equal(plain(input_ids=ids).logits, base(input_ids=ids).logits)


def test_bf16_weights_train_through_fp32_masters_like_the_fp32_model():
    fp32, bf16 = mlp(), mlp(dtype=torch.bfloat16)
    for model in (fp32, bf16):
        engine = siftune.attach(model, config(structure="rows"))
        optimizer = engine.optimizer(lr=1e-2)
        for batch in mlp_batches(6, dtype=model[0].weight.dtype):
            mlp_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        if model is bf16:
            masters = optimizer.master_values()
            assert all(v.dtype == torch.float32 for v in masters.values()) and masters
    assert bf16[0].weight.dtype == torch.bfloat16
    for a, b in zip(fp32.parameters(), bf16.parameters()):
        torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.02)


def test_increment_holds_the_slices_and_applied_to_the_base_gives_the_trained_model(tmp_path):
    _, engine, base, fast, _ = lockstep({"structure": "columns"}, steps=4)
    increment = engine.increment()
    for name, delta in increment.tensors.items():
        assert whole_lines(delta.indices, delta.shape, "columns"), name
    increment.save(tmp_path / "inc")
    loaded = SparseIncrement.load(tmp_path / "inc")
    rebuilt = loaded.apply(copy.deepcopy(base))
    for (name, a), b in zip(fast.named_parameters(), rebuilt.parameters()):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0, msg=name)
    loaded.remove(rebuilt)
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, base.get_parameter(name)), name


@pytest.mark.parametrize("storage", ["in_place", "delta"])
def test_checkpoint_restores_the_selection_and_training_continues_identically(storage):
    cfg = config(structure="rows", storage=storage, mode="periodic", refresh_every=3)
    whole, resumed, _ = whole_and_resumed(cfg, mlp_batches(8), cut=4)
    x = mlp_batches(1, seed=9)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(resumed(x), whole(x), atol=1e-6, rtol=0)


def test_checkpoint_with_lines_out_of_range_is_a_checkpoint_error():
    model = mlp()
    engine = siftune.attach(model, config(structure="rows"))
    state = engine.state_dict()
    state["slots"]["0.weight"]["slice_lines"] = torch.tensor([99])
    with pytest.raises(CheckpointError, match="slice_lines"):
        engine.load_state_dict(state)


def test_detach_restores_the_layer_forward_and_dense_gradients():
    model = mlp()
    engine = siftune.attach(model, config(structure="rows"))
    assert "forward" in model[0].__dict__
    engine.detach()
    assert "forward" not in model[0].__dict__ and model[0].weight.requires_grad
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.shape == model[0].weight.shape


# -- what it refuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    ({"structure": "diagonal"}, "structure must be"),
    ({"structure": "rows", "mode": "per_step"}, "structure='rows'"),
    ({"structure": "columns", "budget": "global"}, "structure='columns'"),
])
def test_unsupported_settings_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(**overrides)


def test_structure_none_spelled_as_a_string_is_unstructured():
    assert config(structure="none").structure is None


def test_a_target_other_than_a_linear_is_a_config_error_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="nn.Linear"):
        siftune.attach(model, SiftConfig(density=0.2, target_modules=["0", "1"], structure="rows"))
    assert all(p.requires_grad for p in model.parameters()) and "forward" not in model[1].__dict__


def test_fsdp2_shards_are_refused_with_a_config_error(monkeypatch):
    from siftune.parallel import distributed

    monkeypatch.setattr(distributed, "is_sharded", lambda t: isinstance(t, nn.Parameter))
    with pytest.raises(ConfigError, match="FSDP2"):
        siftune.attach(mlp(), config(structure="rows"))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_trainer_with_checkpointing_and_accumulation_trains_the_plain_trainer_s_slices(tmp_path):
    pytest.importorskip("trl")
    from trl import SFTTrainer

    from siftune.trainer import SiftMixin, Trainer
    from test_trl import chats, logged_losses, sft_args, tiny_chat_llama

    class SiftSFTTrainer(SiftMixin, SFTTrainer):
        pass

    base, tokenizer = tiny_chat_llama()
    sift_config = SiftConfig(density=0.05, dense_modules=["lm_head"], structure="rows")
    args = dict(gradient_accumulation_steps=2, num_train_epochs=1)
    sft = SiftSFTTrainer(model=copy.deepcopy(base), args=sft_args(tmp_path / "sft", gradient_checkpointing=True,
                                                                   **args),
                         train_dataset=chats(), processing_class=tokenizer, sift_config=sift_config)
    plain = Trainer(model=copy.deepcopy(base), args=sft_args(tmp_path / "plain", **args),
                    train_dataset=sft.train_dataset, data_collator=sft.data_collator, sift_config=sift_config)
    sft.train()
    plain.train()
    assert sft.sift.steps == 2 and len(logged_losses(sft)) == 2
    a, b = sft.increment(), plain.increment()
    assert len(a.tensors) == 14
    for name, delta in a.tensors.items():
        assert whole_lines(delta.indices, delta.shape, "rows"), name
        assert torch.equal(delta.indices, b.tensors[name].indices), name
        torch.testing.assert_close(delta.values, b.tensors[name].values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("storage", ["in_place", "delta"])
def test_bf16_autocast_trains_like_the_reference_under_autocast(storage):
    base = mlp()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, config(structure="rows", storage=storage))
    optimizer = engine.optimizer(lr=1e-2)
    reference = ReferenceSift(slow, config(structure="rows"), lr=1e-2)
    for batch in mlp_batches(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_loss, slow_loss = mlp_loss(fast, batch), mlp_loss(slow, batch)
        fast_loss.backward()
        slow_loss.backward()
        reference.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.step()
    x = mlp_batches(1, seed=9)[0][0]
    with torch.no_grad():
        assert not torch.equal(fast(x), base(x))
        torch.testing.assert_close(fast(x), slow(x), atol=2e-2, rtol=0)
