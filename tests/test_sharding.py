"""SIFT on FSDP2-sharded models: two gloo processes against one process on the combined batch.

Each job starts two processes that join as under ``torchrun`` and run
:func:`_rank_main`; one job runs every training scenario, so the processes
pay their start-up once. The single-process references run meanwhile in the
test process, on whole (unsharded) models.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import siftune  # noqa: E402
from siftune import SiftConfig  # noqa: E402
from siftune.parallel import distributed, sharding  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, TOPK, mlp, mlp_batches, mlp_loss  # noqa: E402
from test_distributed import finish, output, recipe_inputs  # noqa: E402, F401 (a fixture)
from test_distributed import start_job as start_distributed_job  # noqa: E402

WORLD = 2
ATOL = 1e-6
STEPS, GLOBAL_BATCH = 4, 8
JOB_LIMIT_S = 300
ENDS_WITHIN_S = 30  # after a rank dies, the others must have ended by then
UNEVEN = (8, 15, 16, 3)  # 15 and 3 rows: 8 + 7 and 2 + 1 on two ranks
# Every scenario: SiftConfig overrides, micro-batches per step, weight dtype, MLP sizes, HSDP mesh.
SCENARIOS = {
    "fixed": ({}, 1, torch.float32, None),
    "periodic": ({"mode": "periodic", "refresh_every": 2}, 1, torch.float32, None),  # refreshes after step 2
    "per_step": ({"mode": "per_step"}, 1, torch.float32, None),
    "accumulation": ({"selection_batches": 2}, 2, torch.float32, None),  # selects from 2 micro-batches
    "clipping": ({"max_grad_norm": 0.05}, 1, torch.float32, None),
    "bf16 with masters": ({}, 1, torch.bfloat16, None),
    "uneven shards": ({}, 1, torch.float32, UNEVEN),
    "a rank without rows": ({}, 1, torch.float32, (8, 16, 1, 3)),  # layer 2's one row lives on rank 0
    "random": ({"selection": "random", "seed": 3}, 1, torch.float32, None),
    "grad_weight": ({"score": "grad_weight", "mode": "periodic", "refresh_every": 2}, 1, torch.float32, UNEVEN),
    "global budget": ({"budget": "global", "min_density": 0.05, "mode": "periodic", "refresh_every": 2}, 1,
                      torch.float32, UNEVEN),
    "global budget, |g w|, packed": ({"budget": "global", "score": "grad_weight", "compact_indices": True}, 1,
                                     torch.float32, (8, 16, 1, 3)),
    # g^2 of each micro-batch's averaged gradient, over a window that ends inside the second step
    "g^2 window": ({"score": "grad_squared", "selection_batches": 3}, 2, torch.float32, UNEVEN),
    "g^2, global budget": ({"score": "grad_squared", "budget": "global", "min_density": 0.05,
                            "selection_batches": 2}, 2, torch.float32, (8, 16, 1, 3)),
    "snr window": ({"score": "grad_snr", "selection_batches": 3}, 2, torch.float32, UNEVEN),
    "compact indices": ({"compact_indices": True, "state_dtype": "bfloat16"}, 1, torch.float32, None),
    # HSDP on two processes: two replicas of one shard each, or one replica in two shards.
    "hsdp, 2 replicas": ({"max_grad_norm": 0.05}, 1, torch.float32, None, (2, 1)),
    "hsdp, 2 shards": ({"max_grad_norm": 0.05}, 1, torch.float32, None, (1, 2)),
}


# -- what each rank runs (also the single-process reference) ----------------------------------------------


def shard_mlp(model, **options):
    """fully_shard every Linear, then the root, as torchtune shards decoder blocks and the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def train_mixed_precision() -> dict:
    """The fixed scenario under FSDP2's MixedPrecisionPolicy: fp32 shards, bf16 compute, fp32 reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = shard_mlp(mlp(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    before = {n: distributed.full(p) for n, p in model.named_parameters()}
    engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE))
    optimizer = engine.optimizer(lr=1e-2)
    for batch in distributed.shard(mlp_batches(STEPS, batch_size=GLOBAL_BATCH)):
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"before": before, "params": {n: distributed.full(p) for n, p in model.named_parameters()},
            "selected": _whole_selection(engine), "k": {s.name: s.k for s in engine.slots},
            "chosen": (engine.config.selection, engine.config.step_scale)}


def trainer_with_fsdp(out: Path):
    """siftune.trainer.Trainer asked for FSDP2 the way accelerate's plugin is (fsdp_version 2)."""
    from transformers import TrainingArguments, default_data_collator

    from siftune.trainer import Trainer
    from _models import contains_token_dataset, tiny_bert_classifier

    args = TrainingArguments(output_dir=str(out), fsdp=True, fsdp_config={"fsdp_version": 2}, use_cpu=True,
                             report_to=[], max_steps=1)
    Trainer(model=tiny_bert_classifier(), args=args, train_dataset=contains_token_dataset(8),
            data_collator=default_data_collator, sift_config=SiftConfig(density=0.05, dense_modules=["classifier"]))


def tied_selection() -> list[int]:
    """The global indices selected from a score of ties: 1 everywhere, 2 at global indices 70 and 100.

    Layer 0's weight (16 x 8) holds global indices 0-63 on rank 0 and 64-127
    on rank 1; of k = 10, the two 2s and the eight 1s of lowest global index.
    """
    model = shard_mlp(mlp())
    engine = siftune.attach(model, density=10 / 128, target_modules=["0"])
    store, slot = engine.slots[0].storage, engine.slots[0]
    score = torch.ones(store.full_numel)
    score[[70, 100]] = 2.0
    local = score[store.offset:store.offset + store.numel].reshape(store.shape)
    idx = store.top_k(local, slot.k)
    return torch.cat(store.gathered(idx.long() + store.offset)).tolist()


def tied_global_cut() -> list[int]:
    """This rank's part of the 4 largest of scores that all tie: tensor 0 holds 3 on each rank, tensor 1 two.

    In global model order (tensor, then rank, then index) rank 0's three of
    tensor 0 come first, then rank 1's first one of tensor 0; tensor 1's
    entries, first in each rank's own list, get none.
    """
    scores = torch.ones(5)
    tensors = torch.tensor([1, 1, 0, 0, 0])
    order = torch.argsort(tensors, stable=True)  # candidates come in model order
    return sorted(order[distributed.top_over_ranks(scores, tensors[order], 2, 4, None)].tolist())


POOL_TENSORS, POOL_ROWS, POOL_K = 6, 100, 10  # per rank: 6 tensors of 100 entries; 10 of each 200 selected


def pool_scores(tensor: int, rank: int) -> torch.Tensor:
    """Distinct scores of ``rank``'s rows of one tensor, for :func:`pooled_over_ranks`."""
    return torch.rand(POOL_ROWS, generator=torch.Generator().manual_seed(100 * tensor + rank))


def pooled_over_ranks() -> tuple[list[tuple[int, int]], int]:
    """A global budget's pool on shards, fed in backward order: this rank's picks as (tensor, local index),
    checked against the values it kept, and the most entries the rank's pool held at once."""
    from types import SimpleNamespace

    from siftune.core.budget import GlobalPool

    store = SimpleNamespace(full_numel=WORLD * POOL_ROWS, group=None, partial=True)  # a shard's storage
    slots = [SimpleNamespace(name=str(i), numel=POOL_ROWS, k=POOL_K, storage=store) for i in range(POOL_TENSORS)]
    pool = GlobalPool(slots, min_density=0.0)
    for slot in reversed(slots):
        score = pool_scores(int(slot.name), distributed.rank())
        chosen = pool.offer(slot, score, -score)
    picks = []
    for i, (idx, values) in enumerate(chosen):
        assert torch.equal(values, -pool_scores(i, distributed.rank())[idx.long()])
        picks += [(i, j) for j in idx.tolist()]
    return picks, pool.peak


def refusals(folder: Path) -> dict[str, str]:
    """The ConfigError of each setting SIFT cannot honour on a sharded model."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def along_last_dim(param):
        return Shard(param.dim() - 1)

    attempts = {
        "storage delta": lambda: siftune.attach(shard_mlp(mlp()), density=0.2, target_modules=MLP_TARGETS,
                                                storage="delta"),
        "update in backward": lambda: siftune.attach(shard_mlp(mlp()), density=0.2, target_modules=MLP_TARGETS,
                                                     update_in_backward=True).optimizer(),
        "mixed selection": lambda: siftune.attach(shard_mlp(mlp()), density=0.2, target_modules=MLP_TARGETS,
                                                  selection="mixed"),
        "scaled steps": lambda: siftune.attach(shard_mlp(mlp()), density=0.2, target_modules=MLP_TARGETS,
                                               step_scale="input"),
        "shrink": lambda: siftune.attach(shard_mlp(mlp()), density=0.2, target_modules=MLP_TARGETS,
                                         step_scale=None, shrink_after=2, shrink_from=2),
        "select from": lambda: siftune.attach(shard_mlp(mlp()), density=0.2, target_modules=MLP_TARGETS,
                                              step_scale=None, select_from=str(folder / "no-increment")),
        "sharded along dim 1": lambda: siftune.attach(fully_shard(mlp(), shard_placement_fn=along_last_dim),
                                                      density=0.2, target_modules=MLP_TARGETS),
    }
    attempts["trainer with fsdp"] = lambda: trainer_with_fsdp(folder / f"trainer-rank{distributed.rank()}")
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except siftune.ConfigError as exc:
            messages[name] = str(exc)
    return messages


def train_mlp(scenario: str, sync_every_micro_batch: bool = True) -> dict:
    """STEPS optimizer steps; sharded and on this rank's slice of each batch under a process group.

    Without ``sync_every_micro_batch`` FSDP2 reduces the gradients at each
    step's last micro-batch only (``set_requires_gradient_sync``), and the
    engine selects from the one gradient it then sees per step.

    Returns everything gathered whole: weights, each step's gradient norm,
    the final selection (global indices), the increment, and this rank's
    selected count and state bytes.
    """
    overrides, accum, dtype, sizes, *hsdp = SCENARIOS[scenario]
    if not sync_every_micro_batch:
        overrides = {**overrides, "selection_batches": 1}
    model = mlp(dtype=dtype, **({"sizes": sizes} if sizes else {}))
    if distributed.world_size() > 1:
        from torch.distributed.device_mesh import init_device_mesh

        shard_mlp(model, **({"mesh": init_device_mesh("cpu", hsdp[0], mesh_dim_names=("replicate", "shard"))}
                            if hsdp else {}))
    # on shards "auto" is the top-k with plain steps; the single-process reference names them
    engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                              **{**TOPK, **overrides}))
    optimizer = engine.optimizer(lr=1e-2)
    batches = distributed.shard(mlp_batches(STEPS * accum, batch_size=GLOBAL_BATCH, dtype=dtype))
    norms = []
    for _ in range(STEPS):
        for micro in range(accum):
            if not sync_every_micro_batch:
                model.set_requires_gradient_sync(micro == accum - 1)
            mlp_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm)
    increment = engine.increment(values=optimizer.master_values())
    return {"params": {n: distributed.full(p) for n, p in model.named_parameters()}, "norms": norms,
            "selected": _whole_selection(engine), "refreshes": engine.slots[0].version,
            "increment": {n: (d.indices, d.values) for n, d in increment.tensors.items()},
            "dense": increment.dense, "local_selected": sum(i.numel() for i in engine.selected.values()),
            "state_bytes": engine.state_bytes(optimizer)}


def _whole_selection(engine) -> dict[str, torch.Tensor]:
    out = {}
    for slot in engine.slots:
        idx = slot.flat().long()
        if slot.storage.partial:
            idx = torch.cat(slot.storage.gathered(idx + slot.storage.offset))
        out[slot.name] = idx
    return out


def recipe_flags(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``siftune train`` on the tiny BERT: 3 steps of 2 micro-batches, a refresh after step 2, a checkpoint a step."""
    return ["train", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--steps", "3",
            "--batch-size", "4", "--grad-accum", "2", "--eval-size", "7", "--eval-batch-size", "3",
            "--max-length", "16", "--density", "0.05", "--lr", "1e-2", "--warmup-steps", "1", "--mode", "periodic",
            "--refresh-every", "2", "--checkpoint-every", "1", "--quiet", *extra]


def as_if_killed_after_step_2(checkpoints: Path, into: Path) -> None:
    """Copy a run's checkpoint folder as a kill during the third checkpoint's save would have left it."""
    shutil.copytree(checkpoints, into)
    shutil.rmtree(into / "checkpoint-00000003")
    (into / ".checkpoint-00000003.partial").mkdir()
    (into / ".checkpoint-00000003.partial" / "__0_0.distcp").write_bytes(b"half a file")


def load_after_damage(folder: Path) -> tuple[int, list[str]]:
    """Two sharded checkpoints, the newest with rank 1's file cut in half: the step loaded and the warnings."""
    import warnings

    checkpoints = sharding.ShardedCheckpoints(folder)
    for step in (1, 2):
        checkpoints.save({"format_version": 1, "step": step, "values": torch.full((1000,), float(step))})
    if distributed.rank() == 0:
        part = checkpoints.path(2) / "__1_0.distcp"
        part.write_bytes(part.read_bytes()[:part.stat().st_size // 2])
    torch.distributed.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = checkpoints.load_latest()
    return state["step"], [str(w.message) for w in caught]


def _rank_main(job: str, folder: str) -> None:
    """One rank of a job; RANK and the rest come from the environment, as under torchrun."""
    from siftune.cli import main

    folder, rank = Path(folder), int(os.environ["RANK"])
    torch.set_num_threads(1)
    if job == "die":  # siftune train as torchrun starts it; the test kills rank 1 while it trains
        sys.exit(main(recipe_flags(folder / "model", folder / "data.csv", folder / "run", "--fsdp",
                                   "--steps", "100000", "--checkpoint-every", "0")))
    distributed.init()
    results = {scenario: train_mlp(scenario) for scenario in SCENARIOS}
    results["mixed precision"] = train_mixed_precision()
    results["accumulation, synced once a step"] = train_mlp("accumulation", sync_every_micro_batch=False)
    results["ties"] = tied_selection()
    results["global ties"] = tied_global_cut()
    results["pool"] = pooled_over_ranks()
    results["damaged checkpoint"] = load_after_damage(folder / "damaged")
    results["refusals"] = refusals(folder)
    torch.save(results, folder / f"rank{rank}.pt")
    inputs = (folder / "model", folder / "data.csv")
    assert main(recipe_flags(*inputs, folder / "recipe-fsdp", "--fsdp")) == 0
    if rank == 0:
        as_if_killed_after_step_2(folder / "recipe-fsdp" / "checkpoints", folder / "resumed" / "checkpoints")
    torch.distributed.barrier()
    assert main(recipe_flags(*inputs, folder / "resumed", "--fsdp", "--resume")) == 0


# -- jobs --------------------------------------------------------------------------------------------------


def start_job(job: str, folder: Path, timeout_s: float = JOB_LIMIT_S) -> list[subprocess.Popen]:
    """WORLD processes running this module's ``_rank_main(job, folder)``."""
    return start_distributed_job(job, folder, timeout_s, module="test_sharding")


@pytest.fixture(scope="module")
def job(recipe_inputs):
    """The training job's results per rank, and the single-process references."""
    from siftune.cli import main

    folder = recipe_inputs
    procs = start_job("train", folder)
    single = {scenario: train_mlp(scenario) for scenario in SCENARIOS}
    # --fsdp's "auto" is the top-k with plain steps, which one process runs when named
    assert main(recipe_flags(folder / "model", folder / "data.csv", folder / "recipe-single", "--selection",
                             "gradient", "--step-scale", "none")) == 0
    codes, _ = finish(procs, JOB_LIMIT_S)
    assert codes == [0] * WORLD, [output(folder, r)[-3000:] for r in range(WORLD)]
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return folder, ranks, single


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at each entry of ``t`` (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(2.0**-126))) - 7)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scenario: str, name: str) -> None:
    """Equal to float rounding: 1e-6 for fp32 weights, one bfloat16 step of ``expected`` for bf16 weights."""
    diff = (actual.float() - expected.float()).abs()
    allowed = ATOL if SCENARIOS[scenario][2] == torch.float32 else bf16_ulp(expected)
    assert bool((diff <= allowed).all()), f"{name}: off by up to {float(diff.max()):.3g}"


def norm_rtol(scenario: str) -> float:
    # bf16 gradients are rounded after each rank's half of the batch, not once for the whole.
    return 1e-5 if SCENARIOS[scenario][2] == torch.float32 else 2.0**-8


# -- a sharded run is the single-process run --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_run_trains_the_weights_of_one_process_on_the_combined_batch(job, scenario):
    _, ranks, single = job
    for name, expected in single[scenario]["params"].items():
        assert_close(ranks[0][scenario]["params"][name], expected, scenario, name)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_run_selects_exactly_the_components_one_process_selects(job, scenario):
    _, ranks, single = job
    for name, idx in single[scenario]["selected"].items():
        assert torch.equal(ranks[0][scenario]["selected"][name], idx), name


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_run_sees_the_gradient_norm_of_the_combined_batch(job, scenario):
    _, ranks, single = job
    assert ranks[0][scenario]["norms"] == pytest.approx(single[scenario]["norms"], rel=norm_rtol(scenario))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_run_gives_the_increment_of_one_process_on_every_rank(job, scenario):
    _, ranks, single = job
    trained = single[scenario]["params"]
    for rank in ranks:
        for name, (indices, values) in single[scenario]["increment"].items():
            assert torch.equal(rank[scenario]["increment"][name][0].long(), indices.long()), name
            # The values are fp32 changes; compare them at the scale of the weights they change.
            at = trained[name].reshape(-1)[indices.long()]
            allowed = ATOL if SCENARIOS[scenario][2] == torch.float32 else bf16_ulp(at)
            assert bool(((rank[scenario]["increment"][name][1] - values).abs() <= allowed).all()), name
        for name, expected in single[scenario]["dense"].items():
            assert_close(rank[scenario]["dense"][name], expected, scenario, name)


def test_ties_at_the_threshold_are_taken_in_global_index_order(job):
    _, ranks, _ = job
    assert ranks[0]["ties"] == ranks[1]["ties"] == [0, 1, 2, 3, 4, 5, 6, 7, 70, 100]


def test_ties_at_a_global_budgets_cut_are_taken_in_global_model_order(job):
    _, ranks, _ = job
    assert [ranks[0]["global ties"], ranks[1]["global ties"]] == [[2, 3, 4], [2]]


def test_a_global_budgets_pools_hold_about_their_share_of_the_ranking(job):
    # The R best of all ranks' scores, each rank its own; and the ranks' pools together never pass 2R plus
    # one tensor's offers (R from each rank), where each rank alone would keep up to 3R (here 180).
    _, ranks, _ = job
    scored = [(float(pool_scores(i, r)[j]), r, i, j) for i in range(POOL_TENSORS) for r in range(WORLD)
              for j in range(POOL_ROWS)]
    rest = POOL_TENSORS * POOL_K
    best = sorted(scored, reverse=True)[:rest]
    for r in range(WORLD):
        assert ranks[r]["pool"][0] == sorted((i, j) for _, rank, i, j in best if rank == r)
    assert sum(ranks[r]["pool"][1] for r in range(WORLD)) <= 2 * rest + WORLD * rest


def test_accumulating_unsynced_micro_batches_selects_from_the_steps_summed_gradient(job):
    # FSDP2 reduces once a step, so the hooks see one gradient a step: selection_batches=1 then selects
    # from both micro-batches, as one process does with selection_batches=2 (the accumulation scenario).
    _, ranks, single = job
    unsynced, expected = ranks[0]["accumulation, synced once a step"], single["accumulation"]
    assert max_diff(unsynced["params"], expected["params"]) <= ATOL
    assert all(torch.equal(unsynced["selected"][n], idx) for n, idx in expected["selected"].items())


def test_periodic_mode_refreshed_its_selection_inside_the_sharded_run(job):
    _, ranks, single = job
    assert ranks[0]["periodic"]["refreshes"] == single["periodic"]["refreshes"] == 2


def test_the_clipping_scenario_clips_every_step(job):
    _, _, single = job
    assert min(single["clipping"]["norms"]) > SCENARIOS["clipping"][0]["max_grad_norm"]


def test_each_rank_selects_its_own_part_of_the_components(job):
    _, ranks, single = job
    counts = [rank["fixed"]["local_selected"] for rank in ranks]
    assert sum(counts) == single["fixed"]["local_selected"] and min(counts) < max(counts)


@pytest.mark.parametrize("scenario, bytes_per_component", [
    ("fixed", 4 + 4 + 4),  # int32 index, fp32 moments
    ("bf16 with masters", 4 + 4 + 4 + 4),  # and an fp32 master
    ("compact indices", 2 + 2 + 2),  # packed index, bf16 moments
])
def test_a_ranks_state_bytes_are_its_selected_components_times_the_bytes_per_component(job, scenario,
                                                                                       bytes_per_component):
    _, ranks, _ = job
    # Packed indices also hold one int32 count per block of 65,536 entries: one block per tensor here.
    per_tensor = 4 if scenario == "compact indices" else 0
    for rank in ranks:
        held = rank[scenario]["state_bytes"]
        assert held["indices"] + held["gradients"] + held["optimizer"] == (
            bytes_per_component * rank[scenario]["local_selected"] + per_tensor * len(MLP_TARGETS))


def test_under_a_mixed_precision_policy_the_fp32_shards_change_at_the_selected_components_only(job):
    _, ranks, _ = job
    run = ranks[0]["mixed precision"]
    for name, idx in run["selected"].items():
        assert idx.numel() == run["k"][name]
        changed = (run["params"][name] != run["before"][name]).reshape(-1).nonzero().squeeze(1)
        assert run["params"][name].dtype == torch.float32 and torch.equal(changed, idx), name


def test_on_shards_the_default_config_trains_the_top_k_with_plain_steps(job):
    _, ranks, _ = job
    assert ranks[0]["mixed precision"]["chosen"] == ("gradient", None)  # SiftConfig() on FSDP2 shards


def test_under_a_mixed_precision_policy_the_targeted_weights_stay_near_the_fp32_run(job):
    _, ranks, single = job
    # bf16 compute changes the gradients by a few parts in a thousand, and Adam's steps (lr 1e-2) by about
    # as much. The dense head is left out: an entry with a near-zero gradient may step the other way.
    mixed, fp32 = ranks[0]["mixed precision"]["params"], single["fixed"]["params"]
    assert max_diff({n: mixed[n] for n in fp32 if n.startswith(tuple(MLP_TARGETS))}, fp32) < 1e-3


@pytest.mark.parametrize("setting, says", [
    ("storage delta", "storage='delta' needs whole weights"),
    ("update in backward", "update_in_backward works in one process"),
    ("sharded along dim 1", "sharded along dim 0"),
    ("mixed selection", "FSDP2 shards split over the ranks"),
    ("scaled steps", "step_scale='input' needs each weight whole on every process"),
    ("shrink", "leave shrink_after=0 on shards"),
    ("select from", "leave select_from=None on shards"),
])
def test_a_setting_sift_cannot_honour_on_shards_is_a_config_error(job, setting, says):
    _, ranks, _ = job
    assert says in ranks[0]["refusals"].get(setting, "")


# -- siftune train --fsdp ------------------------------------------------------------------------------------


def load_run(folder: Path):
    from siftune import SparseIncrement

    return SparseIncrement.load(folder), json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("run", ["recipe-fsdp", "resumed"])
def test_recipe_with_fsdp_writes_the_increment_of_one_process(job, run):
    folder, _, _ = job
    (sharded, _), (one, _) = load_run(folder / run), load_run(folder / "recipe-single")
    assert sharded.tensors.keys() == one.tensors.keys() and one.tensors
    for name, delta in one.tensors.items():
        assert torch.equal(sharded.tensors[name].indices.long(), delta.indices.long()), name
        assert sharded.tensors[name].shape == delta.shape, name
        assert torch.allclose(sharded.tensors[name].values, delta.values, atol=ATOL), name
    for name, values in one.dense.items():
        assert torch.allclose(sharded.dense[name], values, atol=ATOL), name


@pytest.mark.parametrize("run", ["recipe-fsdp", "resumed"])
def test_recipe_with_fsdp_reports_the_losses_and_held_out_metrics_of_one_process(job, run):
    folder, _, _ = job
    (_, sharded), (_, one) = load_run(folder / run), load_run(folder / "recipe-single")
    assert sharded["losses"] == pytest.approx(one["losses"], abs=ATOL)
    assert (sharded["before"], sharded["after"]) == (one["before"], one["after"])


def test_recipe_with_fsdp_keeps_per_process_checkpoint_folders(job):
    folder, _, _ = job
    checkpoints = folder / "recipe-fsdp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-00000002", "checkpoint-00000003"]
    assert sorted(p.name for p in (checkpoints / "checkpoint-00000003").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]


def test_a_resumed_sharded_run_continued_from_the_last_complete_checkpoint(job):
    folder, _, _ = job
    assert "resuming from" in output(folder, 0, "out") and "checkpoint-00000002 (step 2)" in output(folder, 0, "out")
    assert not (folder / "resumed" / "checkpoints" / ".checkpoint-00000003.partial").exists()


def test_recipe_with_fsdp_in_a_single_process_is_a_config_error(tmp_path, monkeypatch):
    from siftune.recipes.train import TrainArgs, run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(siftune.ConfigError, match="torchrun --nproc_per_node N"):
        run(TrainArgs(model="unused", dataset="unused", output_dir=str(tmp_path), fsdp=True), progress=False)


def test_a_sharded_checkpoint_one_rank_cannot_read_is_skipped_on_every_rank(job):
    _, ranks, _ = job
    for rank in ranks:
        step, warned = rank["damaged checkpoint"]
        assert step == 1 and len(warned) == 1 and "checkpoint-00000002" in warned[0]


def test_a_sharded_checkpoint_on_another_number_of_processes_is_a_checkpoint_error(job):
    folder, _, _ = job
    with pytest.raises(siftune.CheckpointError, match="written by 2 processes, this job has 1"):
        sharding.ShardedCheckpoints(folder / "recipe-fsdp" / "checkpoints").load_latest()


# -- a rank that dies ----------------------------------------------------------------------------------------


def test_a_rank_killed_during_sharded_training_ends_the_others_with_a_distributed_error(recipe_inputs):
    folder = recipe_inputs / "die"
    folder.mkdir()
    for name in ("model", "data.csv"):
        (folder / name).symlink_to(recipe_inputs / name)
    procs = start_job("die", folder, timeout_s=JOB_LIMIT_S)
    deadline = time.monotonic() + JOB_LIMIT_S
    while "siftune train:" not in output(folder, 0, "out") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # into training
    procs[1].send_signal(signal.SIGKILL)
    codes, _ = finish(procs[:1], ENDS_WITHIN_S)
    finish(procs[1:], 0)
    # Exit code 2 from the CLI, which skips the teardown of the broken process group (gloo may abort in it).
    assert codes[0] == 2, output(folder, 0)[-2000:]
    assert "siftune train: error: rank 0 of 2: a collective operation failed" in output(folder, 0)


# -- the transformers Trainer ---------------------------------------------------------------------------------


def test_trainer_with_accelerates_fsdp2_plugin_is_a_config_error_that_names_what_to_use(job):
    _, ranks, _ = job
    assert "siftune.cli train --fsdp" in ranks[0]["refusals"].get("trainer with fsdp", "")


@pytest.mark.parametrize("rank, uncounted", [(0, 0), (1, 1)])
def test_fsdp_evaluation_runs_every_rank_through_as_many_batches_and_counts_each_example_once(
        monkeypatch, rank, uncounted):
    from conftest import make_tiny_tokenizer
    from _models import tiny_bert_classifier
    from siftune.recipes.train import NOT_COUNTED, TrainArgs, _BatchMaker, evaluate

    examples = [{"text": f"film {i}", "label": "pos" if i % 2 else "neg"} for i in range(7)]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "sum_across_ranks", lambda values: list(values))  # this rank's counts only
    args = TrainArgs(model="unused", dataset="unused", eval_batch_size=3, max_length=8, fsdp=True)
    batches = list(_BatchMaker(args, make_tiny_tokenizer(), ["neg", "pos"]).eval(examples))
    assert len(batches) == 2  # ceil(4 / 3): rank 0 holds examples 0, 2, 4, 6; rank 1 holds 1, 3, 5 and one filler
    assert sum(bool(b.get(NOT_COUNTED)) for b in batches) == uncounted
    assert evaluate(tiny_bert_classifier(), batches, "classification")["examples"] == 4 - rank


def test_a_sharded_checkpoint_with_a_flipped_bit_is_skipped_for_the_one_before(tmp_path):
    """DCP stores tensors as raw bytes: without the checksum a flipped bit would load as a wrong value."""
    import warnings

    from siftune.artifacts.checkpoint import FORMAT_VERSION

    checkpoints = sharding.ShardedCheckpoints(tmp_path)
    values = torch.arange(1000, dtype=torch.float32) * 1.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        for step in (3, 4):
            checkpoints.save({"step": step, "format_version": FORMAT_VERSION, "values": values + step})
    part = checkpoints.path(4) / "__0_0.distcp"
    raw = bytearray(part.read_bytes())
    at = raw.find((values + 4).numpy().tobytes()[400:408])
    assert at > 0
    raw[at] ^= 1
    part.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        state = checkpoints.load_latest()
    assert state["step"] == 3 and torch.equal(state["values"], values + 3)
