"""The sweep's questions about its records (bench/sweep.sh): is a cell's record there, and which rate won.

A FIELD=VALUE is a SIFT option, or dense_lr=RATE for the head's rate (without it, records at the task's
default head rate: siftune.bench.runner.TASKS).
    python bench/sweep_records.py have FOLDER TASK STEPS SEED METHOD[:SETTING] LR [FIELD=VALUE ...]
        exit status 0 when the record is there (with validation), 1 when not
    python bench/sweep_records.py best FOLDER TASK STEPS METHOD[:SETTING] [FIELD=VALUE ...]
        prints seed 0's rate with the best validation score ("" when none ran); a tie goes to the
        lower rate, as in the report (siftune.bench.report.chosen_on_validation)
    python bench/sweep_records.py best-head FOLDER TASK STEPS METHOD[:SETTING] LR [FIELD=VALUE ...]
        prints the head's rate with the best validation score among seed 0's records at LR, whatever their
        head's rate ("" when none ran); a tie goes to the lower head rate
    python bench/sweep_records.py beyond FOLDER TASK STEPS METHOD[:SETTING] [FIELD=VALUE ...]
        prints the rate one step of 2 beyond seed 0's grid when its best rate is at an edge of it
        ("" when inside, or when fewer than two rates ran)
"""
import json
import math
import pathlib
import sys


def matching(folder: str, task: str, steps: str, token: str, fields: list[str], any_head: bool = False) -> list[dict]:
    """The records of ``token`` (``method[:setting]``) at ``steps`` with validation and exactly ``fields``
    as their SIFT options (a sift-* method's score defaults to ``grad_weight``, as the sweep ran it), at the
    head's rate ``fields`` give (or the task's default), or at any with ``any_head``."""
    method, _, setting = token.partition(":")
    if method in ("lora", "shira") and not setting:
        setting = "8"
    if method not in ("full", "base", "head", "lora", "shira", "qlora") and not setting:
        setting = "matched"
    want = dict(field.split("=", 1) for field in fields)
    head = want.pop("dense_lr", None)
    if method.startswith("sift-"):
        want = {"score": "grad_weight", **want}
    path = pathlib.Path(folder) / f"{task}.json"
    runs = [r for r in (json.loads(path.read_text()) if path.is_file() else [])
            if (r["method"], str(r["setting"]), r["steps"]) == (method, setting, int(steps))
            and r.get("val_examples") and {k: str(v) for k, v in (r.get("sift") or {}).items()} == want]
    return [r for r in runs
            if any_head or "dense_lr" not in r or same_rate(r["dense_lr"], head_rate(task, method, r, head))]


def head_rate(task: str, method: str, record: dict, given: str | None) -> float:
    """The head's rate a cell asks for: ``given``, else the task's default for ``method`` (else its rate)."""
    if given is not None:
        return float(given)
    from siftune.bench.runner import TASKS  # imports torch: only for records that name a head rate
    return TASKS[task].head_lr(method, record["lr"])


def same_rate(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * abs(b)


def ranked(score: float) -> float:
    """``score`` for ranking, higher is better: a run that diverged (a loss of NaN) ranks last (as in
    siftune.bench.report, which imports torch)."""
    return score if score == score else -math.inf


def best_rate(runs: list[dict], field: str = "lr") -> float | None:
    """The rate (``field``: ``"lr"`` or the head's ``"dense_lr"``) with the best validation score among ``runs``
    (one seed's grid); a tie goes to the lower rate."""
    sign = -1 if runs and runs[0]["metric"] == "loss" else 1
    return max(runs, key=lambda r: (ranked(sign * r["val_value"]), -r[field]))[field] if runs else None


def main(argv: list[str]) -> int:
    if argv[:1] == ["have"]:
        folder, task, steps, seed, token, lr, *fields = argv[1:]
        return 0 if any(r["seed"] == int(seed) and same_rate(r["lr"], float(lr))
                        for r in matching(folder, task, steps, token, fields)) else 1
    if argv[:1] == ["best"]:
        folder, task, steps, token, *fields = argv[1:]
        lr = best_rate([r for r in matching(folder, task, steps, token, fields) if r["seed"] == 0])
        print("" if lr is None else lr)
        return 0
    if argv[:1] == ["best-head"]:
        folder, task, steps, token, lr, *fields = argv[1:]
        runs = [r for r in matching(folder, task, steps, token, fields, any_head=True)
                if r["seed"] == 0 and same_rate(r["lr"], float(lr))]
        head = best_rate(runs, "dense_lr")
        print("" if head is None else f"{head:g}")
        return 0
    if argv[:1] == ["beyond"]:
        folder, task, steps, token, *fields = argv[1:]
        runs = [r for r in matching(folder, task, steps, token, fields) if r["seed"] == 0]
        rates = sorted({r["lr"] for r in runs})
        lr = best_rate(runs)
        if len(rates) < 2 or rates[0] < lr < rates[-1]:
            print("")
        else:
            print(f"{2 * lr:g}" if lr == rates[-1] else f"{lr / 2:g}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
