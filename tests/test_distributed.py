"""Data-parallel SIFT on torch.distributed: two gloo processes against one process on the combined batch.

Each job starts two real processes that join through the launcher's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as
``torchrun`` sets them, and runs :func:`_rank_main` below. One job runs every
training scenario, so the processes pay their start-up once.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import siftune  # noqa: E402
from siftune import SiftConfig  # noqa: E402
from siftune.parallel import distributed  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, contains_token_dataset, mlp, mlp_batches, mlp_loss  # noqa: E402

WORLD = 2
ATOL = 1e-6
STEPS, ACCUM, GLOBAL_BATCH = 4, 2, 8
MLP_MODES = {"fixed": {}, "periodic": {"mode": "periodic", "refresh_every": 2},  # refreshes after step 2
             # storage="delta": the weights stay as they are, the trained values sit beside them
             "delta": {"storage": "delta", "mode": "periodic", "refresh_every": 2},
             # the selection options: one ranking over all tensors from the summed score; |g w| on a delta
             "global": {"budget": "global", "min_density": 0.05, "mode": "periodic", "refresh_every": 2},
             "delta, |g w|": {"storage": "delta", "score": "grad_weight", "mode": "periodic", "refresh_every": 2},
             # g^2 of the combined micro-batches, over a window that ends inside the second step
             "g^2 window": {"score": "grad_squared", "selection_batches": 3, "mode": "periodic", "refresh_every": 2},
             "delta, g^2, global": {"storage": "delta", "score": "grad_squared", "budget": "global",
                                    "min_density": 0.05, "selection_batches": 2},
             # selections beyond the top-k: from the combined batch's score, the same on every rank
             "mixed": {"selection": "mixed", "mode": "periodic", "refresh_every": 2},
             "delta, balanced": {"storage": "delta", "selection": "balanced", "line_cap": 1.0},
             "grow and drop": {"selection": "grow_drop", "mode": "periodic", "refresh_every": 2, "drop_share": 0.5},
             # whole rows (columns): each rank computes its slice's gradient only, the engine all-reduces it
             "rows": {"structure": "rows", "mode": "periodic", "refresh_every": 2},
             "columns, delta": {"structure": "columns", "storage": "delta", "mode": "periodic", "refresh_every": 2},
             # the window before training (SiftEngine.select), on batches of its own
             # the signal-to-noise score: the combined micro-batches' sum and squares
             "snr, selected first": {"score": "grad_snr", "selection_batches": 3},
             # steps scaled by the combined batch's input sizes (each rank sees half of it)
             "scaled steps, balanced": {"step_scale": "input", "selection": "balanced", "line_cap": 1.0,
                                        "mode": "periodic", "refresh_every": 2},
             # twice the count for two steps, then the half that changed most: the same on every rank
             "shrink, balanced": {"selection": "balanced", "line_cap": 1.0, "shrink_after": 2, "shrink_from": 2.0},
             # ranked by an earlier run's change (written by the job's fixture, read by every rank)
             "select from an earlier run": {"selection": "balanced", "line_cap": 1.0, "select_from": "EARLIER"}}
EARLIER = "SIFTUNE_TEST_EARLIER_RUN"  # the environment variable naming the earlier run's increment folder
SELECTED_FIRST = {"snr, selected first"}
JOB_LIMIT_S = 300  # a safety net for slow, shared machines; the tests time what matters themselves
HANG_TIMEOUT_S = 4
ENDS_WITHIN_S = 30  # after a rank fails, the others must have ended by then
TRAINER_TARGETS = ["query", "value"]


# -- what each rank runs (also the single-process reference) ----------------------------------------------


def train_mlp(mode: str, ddp: bool = False) -> dict:
    """STEPS optimizer steps of ACCUM micro-batches; this rank's slice of each batch when distributed.

    Returns the final parameters and each step's gradient norm (which sees any
    wrong scaling of the exchanged gradient, unlike Adam's update).
    """
    model = mlp()
    options = dict(MLP_MODES[mode])
    if options.get("select_from") == "EARLIER":
        options["select_from"] = os.environ[EARLIER]
    engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                              max_grad_norm=0.5, **options))
    forward = model
    if ddp:
        forward = torch.nn.parallel.DistributedDataParallel(model)  # after attach: leaves targeted weights alone
        engine.reduce_dense = False
    optimizer = engine.optimizer(lr=1e-2)
    if mode in SELECTED_FIRST:
        engine.select(distributed.shard(mlp_batches(3, batch_size=GLOBAL_BATCH, seed=7)), mlp_loss)
    batches = distributed.shard(mlp_batches(STEPS * ACCUM, batch_size=GLOBAL_BATCH))
    norms = []
    for _ in range(STEPS):
        for micro in range(ACCUM):
            # DDP reduces the dense head once per optimizer step, like the engine.
            with forward.no_sync() if ddp and micro < ACCUM - 1 else nullcontext():
                mlp_loss(forward, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm)
    with torch.no_grad():
        outputs = model(mlp_batches(1, seed=99)[0][0])  # what the model computes, delta included
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "norms": norms,
            "refreshes": engine.slots[0].version, "outputs": outputs}


def train_recipe(model_dir: Path, data: Path, out: Path) -> None:
    """``siftune train``'s recipe, as the CLI runs it."""
    from siftune.recipes.train import TrainArgs, run

    run(TrainArgs(model=str(model_dir), dataset=str(data), output_dir=str(out), steps=3, batch_size=4, grad_accum=2,
                  eval_size=8, eval_batch_size=3, max_length=16, density=0.05, lr=1e-2, warmup_steps=1,
                  mode="periodic", refresh_every=2), progress=False)


def train_with_trainer(out: Path, per_device_batch: int, dense_modules=("classifier",)) -> dict:
    """siftune.trainer.Trainer on the tiny BERT: in order, 3 steps of 2 micro-batches."""
    from transformers import TrainingArguments, default_data_collator

    from siftune.trainer import Trainer
    from _models import tiny_bert_classifier

    model = tiny_bert_classifier()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=per_device_batch, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=5e-2, max_grad_norm=1.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        train_sampling_strategy="sequential",
        # Else transformers multiplies the loss by the process count for models taking loss kwargs.
        average_tokens_across_devices=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=contains_token_dataset(32),
                      data_collator=default_data_collator,
                      sift_config=SiftConfig(density=0.05, target_modules=TRAINER_TARGETS, dense_modules=dense_modules))
    trainer.train()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "wrapper": type(trainer.model_wrapped).__name__, "reduce_dense": trainer.sift.reduce_dense}


def sharding_after_attach_error() -> str:
    """What SIFT says when the model is sharded by FSDP2's fully_shard after attach."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    engine = siftune.attach(model, density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE)
    fully_shard(model)
    try:
        engine.optimizer(lr=1e-2)
    except siftune.ConfigError as exc:
        return str(exc)
    return ""


def _rank_main(job: str, folder: str) -> None:
    """One rank of a job; RANK and the rest come from the environment, as under torchrun."""
    folder, rank = Path(folder), int(os.environ["RANK"])
    torch.set_num_threads(1)
    _all_ready(folder, rank)
    distributed.init()
    if job == "train":
        results = {mode: train_mlp(mode) for mode in MLP_MODES}
        results["ddp"] = train_mlp("periodic", ddp=True)
        results["fully_shard"] = sharding_after_attach_error()
        train_recipe(folder / "model", folder / "data.csv", folder / f"recipe-rank{rank}")
        results["trainer"] = train_with_trainer(folder / f"trainer-rank{rank}", GLOBAL_BATCH // WORLD // 2)
        try:
            train_with_trainer(folder / f"trainer-rank{rank}", GLOBAL_BATCH // WORLD // 2, dense_modules=())
        except siftune.ConfigError as exc:
            results["trainer without dense modules"] = str(exc)
        torch.save(results, folder / f"rank{rank}.pt")
        return
    model = mlp()
    engine = siftune.attach(model, density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE)
    optimizer = engine.optimizer(lr=1e-2)
    for step, batch in enumerate(distributed.shard(mlp_batches(20, batch_size=GLOBAL_BATCH))):
        if rank == 1 and step == 2:
            (folder / "failed_at").write_text(repr(time.time()))
            if job == "raise":
                raise RuntimeError("rank 1 gives up at step 2")
            time.sleep(600)  # "hang": alive, but never joins the next collective
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def _all_ready(folder: Path, rank: int) -> None:
    """Wait until every rank has imported everything, so that slow start-ups do not eat a short timeout."""
    (folder / f"ready{rank}").touch()
    while not all((folder / f"ready{r}").exists() for r in range(WORLD)):
        time.sleep(0.05)


# -- jobs --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(job: str, folder: Path, timeout_s: float = JOB_LIMIT_S,
              module: str = "test_distributed") -> list[subprocess.Popen]:
    """WORLD processes running ``module._rank_main(job, folder)``; output in folder/rank{r}.out and .err."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: str(timeout_s),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
        code = f"from {module} import _rank_main; _rank_main({job!r}, {str(folder)!r})"
        with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=err))
    return procs


def finish(procs: list[subprocess.Popen], limit_s: float) -> tuple[list[int | None], list[float | None]]:
    """Exit codes and times (``time.time()``) within ``limit_s`` seconds; None: still running, then killed."""
    deadline = time.monotonic() + limit_s
    codes, ended = [None] * len(procs), [None] * len(procs)
    while time.monotonic() < deadline and None in codes:
        for i, proc in enumerate(procs):
            if codes[i] is None and proc.poll() is not None:
                codes[i], ended[i] = proc.returncode, time.time()
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return codes, ended


def output(folder: Path, rank: int, stream: str = "err") -> str:
    return (folder / f"rank{rank}.{stream}").read_text()


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory) -> Path:
    """A folder with a dropout-free tiny BERT (model/) and a 40-row CSV (data.csv)."""
    from conftest import make_tiny_tokenizer
    from _models import tiny_bert_classifier

    folder = tmp_path_factory.mktemp("distributed")
    tiny_bert_classifier().save_pretrained(folder / "model")
    make_tiny_tokenizer().save_pretrained(folder / "model")
    rows = ["text,label"] + [f"{'good fun' if i % 2 else 'dull slow'} film {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(40)]
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def job(recipe_inputs):
    """The training job's results per rank; the single-process references are computed meanwhile."""
    folder = recipe_inputs
    earlier = siftune.attach(mlp(), SiftConfig(density=0.4, target_modules=MLP_TARGETS, step_scale=None))
    optimizer = earlier.optimizer(lr=1e-2)
    for batch in mlp_batches(2, seed=11):
        mlp_loss(earlier.model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    earlier.increment(values=optimizer.master_values()).save(folder / "earlier")
    os.environ[EARLIER] = str(folder / "earlier")  # the ranks inherit it
    procs = start_job("train", folder)
    single = {mode: train_mlp(mode) for mode in MLP_MODES}
    train_recipe(folder / "model", folder / "data.csv", folder / "recipe-single")
    single["trainer"] = train_with_trainer(folder / "trainer-single", GLOBAL_BATCH // 2)
    codes, _ = finish(procs, JOB_LIMIT_S)
    assert codes == [0] * WORLD, [output(folder, r)[-3000:] for r in range(WORLD)]
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return folder, ranks, single


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """The "raise" and "hang" jobs, run side by side.

    Per job: its folder, the ranks' exit codes, and the seconds from rank 1's
    failure to rank 0's exit. Rank 0 must end by itself; rank 1 of "hang"
    sleeps on and is killed afterwards.
    """
    folders = {job: tmp_path_factory.mktemp(job) for job in ("raise", "hang")}
    procs = {job: start_job(job, folder, timeout_s=HANG_TIMEOUT_S) for job, folder in folders.items()}
    out = {}
    for job, ps in procs.items():
        (code0,), (ended0,) = finish(ps[:1], JOB_LIMIT_S)
        (code1,), _ = finish(ps[1:], 0 if job == "hang" else JOB_LIMIT_S)
        failed_at = float((folders[job] / "failed_at").read_text())
        out[job] = (folders[job], [code0, code1], None if ended0 is None else ended0 - failed_at)
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# -- exchanging selected gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MLP_MODES)
def test_two_processes_train_the_same_weights_as_one_process_on_the_combined_batch(job, mode):
    _, ranks, single = job
    assert max_diff(ranks[0][mode]["params"], single[mode]["params"]) <= ATOL


@pytest.mark.parametrize("mode", MLP_MODES)
def test_two_processes_see_the_gradient_norm_of_the_combined_batch(job, mode):
    _, ranks, single = job
    assert ranks[0][mode]["norms"] == pytest.approx(single[mode]["norms"], rel=1e-5)


@pytest.mark.parametrize("mode", MLP_MODES)
def test_two_processes_compute_what_one_process_computes_after_training(job, mode):
    _, ranks, single = job
    torch.testing.assert_close(ranks[0][mode]["outputs"], single[mode]["outputs"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ranks[1][mode]["outputs"], single[mode]["outputs"], atol=ATOL, rtol=0)


def test_periodic_mode_refreshed_its_selection_inside_the_run(job):
    _, ranks, single = job
    assert ranks[0]["periodic"]["refreshes"] == single["periodic"]["refreshes"] == 2


@pytest.mark.parametrize("scenario", [*MLP_MODES, "ddp", "trainer"])
def test_every_rank_ends_with_identical_weights(job, scenario):
    _, ranks, _ = job
    assert max_diff(ranks[0][scenario]["params"], ranks[1][scenario]["params"]) == 0.0


def test_a_model_wrapped_in_ddp_after_attach_trains_the_same_weights_as_one_process(job):
    _, ranks, single = job
    assert max_diff(ranks[0]["ddp"]["params"], single["periodic"]["params"]) <= ATOL
    assert ranks[0]["ddp"]["norms"] == pytest.approx(single["periodic"]["norms"], rel=1e-5)


def test_trainer_under_two_processes_wraps_in_ddp_and_leaves_the_head_to_it(job):
    _, ranks, single = job
    assert (ranks[0]["trainer"]["wrapper"], ranks[0]["trainer"]["reduce_dense"]) == ("DistributedDataParallel", False)
    assert single["trainer"]["reduce_dense"] is True


def test_trainer_under_two_processes_without_dense_modules_is_a_config_error(job):
    _, ranks, _ = job
    assert "DistributedDataParallel" in ranks[0].get("trainer without dense modules", "")


def test_trainer_under_two_processes_trains_the_same_weights_as_one_process(job):
    _, ranks, single = job
    assert max_diff(ranks[0]["trainer"]["params"], single["trainer"]["params"]) <= ATOL


def test_sharding_a_model_after_attach_is_a_config_error_when_the_optimizer_is_made(job):
    _, ranks, _ = job
    assert "no longer the tensor SIFT attached to" in ranks[0]["fully_shard"]


# -- the siftune train recipe --------------------------------------------------------------------------------


def test_recipe_under_two_processes_writes_the_increment_of_one_process(job):
    from siftune import SparseIncrement

    folder, _, _ = job
    two, one = SparseIncrement.load(folder / "recipe-rank0"), SparseIncrement.load(folder / "recipe-single")
    assert two.tensors.keys() == one.tensors.keys() and two.tensors
    for name, delta in one.tensors.items():
        assert torch.equal(two.tensors[name].indices, delta.indices), name
        assert torch.allclose(two.tensors[name].values, delta.values, atol=ATOL), name
    assert max_diff(two.dense, one.dense) <= ATOL


def test_recipe_under_two_processes_reports_the_metrics_of_one_process(job):
    import json

    folder, _, _ = job
    two = json.loads((folder / "recipe-rank0" / "metrics.json").read_text())
    one = json.loads((folder / "recipe-single" / "metrics.json").read_text())
    assert two["losses"] == pytest.approx(one["losses"], abs=ATOL)
    assert (two["before"], two["after"]) == (one["before"], one["after"])  # held-out set split and summed


def test_recipe_prints_and_writes_on_rank_0_only(job):
    folder, _, _ = job
    assert "siftune train:" in output(folder, 0, "out")
    assert output(folder, 1, "out") == ""
    assert not (folder / "recipe-rank1").exists()


# -- failing ranks -------------------------------------------------------------------------------------------


def test_a_rank_that_raises_ends_the_job_with_a_distributed_error_on_the_others(failures):
    folder, codes, seconds = failures["raise"]
    assert codes[0] not in (0, None) and codes[1] not in (0, None), codes
    assert "rank 1 gives up at step 2" in output(folder, 1)
    assert "DistributedError: rank 0 of 2: a collective operation failed" in output(folder, 0)
    assert seconds < ENDS_WITHIN_S


def test_a_rank_that_stops_responding_makes_the_others_time_out_with_a_distributed_error(failures):
    folder, codes, seconds = failures["hang"]
    assert codes[0] not in (0, None), codes
    error = output(folder, 0)
    assert "DistributedError: rank 0 of 2" in error and f"give up after {HANG_TIMEOUT_S:g} s" in error
    assert HANG_TIMEOUT_S <= seconds < ENDS_WITHIN_S


# -- sharding ------------------------------------------------------------------------------------------------


def test_shards_of_a_batch_put_together_are_the_batch():
    batch = {"input_ids": torch.arange(24).reshape(8, 3), "labels": torch.arange(8)}
    parts = [distributed.shard_batch(batch, part, 4) for part in range(4)]
    for key, value in batch.items():
        assert torch.equal(torch.cat([p[key] for p in parts]), value)


def test_a_batch_that_does_not_split_evenly_is_a_config_error():
    with pytest.raises(siftune.ConfigError, match="multiple of 3"):
        distributed.shard_batch(torch.zeros(8, 2), 0, 3)


def test_outside_a_launched_job_everything_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    batches = [(torch.ones(3, 2), torch.zeros(3))]
    assert distributed.init() is False
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    assert list(distributed.shard(batches))[0][0].shape == (3, 2)
    assert distributed.sum_across_ranks([1.5, 2]) == [1.5, 2]


def test_a_bad_timeout_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(siftune.ConfigError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_s()


def test_a_world_size_without_the_other_launcher_variables_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(siftune.ConfigError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init()
