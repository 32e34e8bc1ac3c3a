"""siftune.estimate.fsdp: one rank's simulated FSDP2 memory is what a real sharded run allocates.

The simulation runs rank 0 of a job on a fake process group and fake
tensors and counts allocations with ``FSDPMemTracker``; the twin is a real
two-process gloo job training the same steps on this CPU, each rank reading
torch's CPU allocator count. At the tiny shape rank 0's peaks must agree, so
what the simulation states at 7B-70B is a count of real allocations.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from siftune.estimate import Setup
from siftune.estimate.fsdp import measure_cpu, trace
from siftune.estimate.shapes import LLAMA_SHAPES, named_config

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from test_distributed import WORLD, finish, output, start_job  # noqa: E402

MiB = 2**20
SEQ = 64
TINY = named_config("llama-tiny")
SETUPS = {"full": Setup("full", dtype="float32", seq_len=SEQ, gradient_checkpointing=True),
          "sift-5": Setup("sift", density=0.05, dtype="float32", seq_len=SEQ, gradient_checkpointing=True)}
METHODS = tuple(SETUPS)


def peaks(record: dict) -> list[int]:
    return [max(phase["total"] for phase in step["phases"].values()) for step in record["steps"]]


def _rank_main(job: str, folder: str) -> None:
    """Each rank: the real steps of every method of ``METHODS``, one process group for all."""
    results = {method: measure_cpu(TINY, SETUPS[method], warmup=1) for method in METHODS}
    rank = results[METHODS[0]]["rank"]
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp_memory")
    procs = start_job("real", folder, module="test_simulate_fsdp")
    codes, _ = finish(procs, 300)
    assert codes == [0] * WORLD, output(folder, 0)[-3000:] + output(folder, 1)[-3000:]
    return json.loads((folder / "rank0.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_simulated_rank_peaks_match_a_real_two_process_fsdp_run(real_runs, method):
    real = real_runs[method]
    simulated = trace(TINY, SETUPS[method], world=WORLD, warmup=1)
    assert len(real["peaks"]) == len(peaks(simulated)) == 2
    # Known gaps: the real count holds SIFT's ledger (host memory on a GPU; an int32 index and
    # an fp32 value a component here) and the real rank's own share of each tensor's top-k,
    # where the simulation gives every rank an equal share: 16 B a component of state, and
    # up to 16 B more of the update's temporaries when the peak falls in the optimizer step.
    allowed = 16 * 1024
    if real["selected"] is not None:
        allowed += 8 * real["selected"] + 32 * abs(real["selected"] - simulated["selected_rank0"])
    # In full fine-tuning the root group's reduce-scatter input (the unsharded gradients of the
    # embedding, the output layer and the final norm) is last held by the gloo work that all-reduces it, and gloo's
    # worker thread lets go of it before or after the next step begins, varying from run to run
    # (about 1 in 3 on a loaded CPU); NCCL's is freed at its event. So a real step may hold that
    # buffer more, exactly: once, or, with more processes than cores (measured once among the sweep's
    # runs), the previous step's too.
    # SIFT's steps show the same effect on smaller buffers: its real steady step has measured 0.36 to
    # 0.65 MB above the simulation from run to run; 1 MiB of slack covers that and nothing larger.
    if real["selected"] is not None:
        allowed += MiB
    hidden = LLAMA_SHAPES["llama-tiny"][0]
    root_grads = (2 * 32000 + 1) * hidden * 4 if method == "full" else 0  # fp32
    for step, (r, s) in enumerate(zip(real["peaks"], peaks(simulated))):
        assert any(abs(r - held * root_grads - s) <= allowed for held in (0, 1, 2)), (
            f"step {step}: real {r / MiB:.3f} MiB, simulated {s / MiB:.3f} MiB")


def test_sift_state_per_rank_is_its_share_of_the_components_at_the_stated_bytes():
    record = trace(TINY, Setup("sift", density=0.05, seq_len=16, gradient_checkpointing=True), world=4, warmup=0)
    state = record["state_bytes_rank0"]
    mine = record["selected_rank0"]
    assert record["selected"] / 4 <= mine <= record["selected"] / 4 + 7 * 2  # 7 targeted weights a layer
    assert state["indices"] == 4 * mine  # int32 flat indices into the rank's rows
    assert state["optimizer"] == 12 * mine  # fp32 master and two fp32 moments (bf16 weights)
    # After the step only the shards are held: bf16, a quarter each (rows padded to 4).
    sharded = record["steps"][0]["phases"]["optimizer"]["parameters"]
    assert abs(sharded - 2 * record["params"] / 4) < 2 * 4096


def test_a_simulation_leaves_no_process_group_behind():
    import torch.distributed as dist

    trace(TINY, Setup("frozen", seq_len=16), world=2, warmup=0)
    assert not dist.is_initialized()
