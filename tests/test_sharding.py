"""SIFT on FSDP2-sharded models: two gloo processes against one process on the combined batch.

Each job starts two processes that join as under ``torchrun`` and run
:func:`_rank_main`; one job runs every training scenario, so the processes
pay their start-up once. The single-process references run meanwhile in the
test process, on whole (unsharded) models.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import siftune  # noqa: E402
from siftune import SiftConfig, distributed, sharding  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss  # noqa: E402
from test_distributed import _free_port, finish, output  # noqa: E402

WORLD = 2
ATOL = 1e-6
STEPS, GLOBAL_BATCH = 4, 8
JOB_LIMIT_S = 300
UNEVEN = (8, 15, 16, 3)  # 15 and 3 rows: 8 + 7 and 2 + 1 on two ranks
# Every scenario: SiftConfig overrides, micro-batches per step, weight dtype, MLP sizes.
SCENARIOS = {
    "fixed": ({}, 1, torch.float32, None),
    "periodic": ({"mode": "periodic", "refresh_every": 2}, 1, torch.float32, None),  # refreshes after step 2
    "per_step": ({"mode": "per_step"}, 1, torch.float32, None),
    "accumulation": ({"selection_batches": 2}, 2, torch.float32, None),  # selects from 2 micro-batches
    "clipping": ({"max_grad_norm": 0.05}, 1, torch.float32, None),
    "bf16 with masters": ({}, 1, torch.bfloat16, None),
    "uneven shards": ({}, 1, torch.float32, UNEVEN),
    "random": ({"selection": "random", "seed": 3}, 1, torch.float32, None),
    "compact indices": ({"compact_indices": True, "state_dtype": "bfloat16"}, 1, torch.float32, None),
}


# -- what each rank runs (also the single-process reference) ----------------------------------------------


def shard_mlp(model):
    """fully_shard every Linear, then the root, as torchtune shards decoder blocks and the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train_mlp(scenario: str) -> dict:
    """STEPS optimizer steps; sharded and on this rank's slice of each batch under a process group.

    Returns everything gathered whole: weights, each step's gradient norm,
    the final selection (global indices), the increment, and this rank's
    selected count and state bytes.
    """
    overrides, accum, dtype, sizes = SCENARIOS[scenario]
    model = mlp(dtype=dtype, **({"sizes": sizes} if sizes else {}))
    if distributed.world_size() > 1:
        shard_mlp(model)
    engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                              **overrides))
    optimizer = engine.optimizer(lr=1e-2)
    batches = distributed.shard(mlp_batches(STEPS * accum, batch_size=GLOBAL_BATCH, dtype=dtype))
    norms = []
    for _ in range(STEPS):
        for _ in range(accum):
            mlp_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm)
    increment = engine.increment(values=optimizer.master_values())
    return {"params": {n: sharding.full(p) for n, p in model.named_parameters()}, "norms": norms,
            "selected": _whole_selection(engine), "refreshes": engine.slots[0].version,
            "increment": {n: (d.indices, d.values) for n, d in increment.tensors.items()},
            "dense": increment.dense, "local_selected": sum(i.numel() for i in engine.selected.values()),
            "state_bytes": engine.state_bytes(optimizer)}


def _whole_selection(engine) -> dict[str, torch.Tensor]:
    out = {}
    for slot in engine.slots:
        idx = slot.flat().long()
        if isinstance(slot.storage, sharding.ShardedInPlace):
            idx = torch.cat(sharding._all_gather_varying(idx + slot.storage.offset, slot.storage))
        out[slot.name] = idx
    return out


def _rank_main(job: str, folder: str) -> None:
    """One rank of a job; RANK and the rest come from the environment, as under torchrun."""
    folder, rank = Path(folder), int(os.environ["RANK"])
    torch.set_num_threads(1)
    distributed.init()
    if job == "train":
        results = {scenario: train_mlp(scenario) for scenario in SCENARIOS}
        torch.save(results, folder / f"rank{rank}.pt")


# -- jobs --------------------------------------------------------------------------------------------------


def start_job(job: str, folder: Path, timeout_s: float = JOB_LIMIT_S) -> list[subprocess.Popen]:
    """WORLD processes running ``_rank_main(job, folder)``; output in folder/rank{r}.out and .err."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: str(timeout_s),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
        code = f"from test_sharding import _rank_main; _rank_main({job!r}, {str(folder)!r})"
        with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=err))
    return procs


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The training job's results per rank, and the single-process references."""
    folder = tmp_path_factory.mktemp("sharding")
    procs = start_job("train", folder)
    single = {scenario: train_mlp(scenario) for scenario in SCENARIOS}
    codes, _ = finish(procs, JOB_LIMIT_S)
    assert codes == [0] * WORLD, [output(folder, r)[-3000:] for r in range(WORLD)]
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return folder, ranks, single


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
