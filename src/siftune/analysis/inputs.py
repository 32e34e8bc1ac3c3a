"""What both analyses start from: their shared arguments, the two models, fixed batches, the loss.

The "pretrained" model is the checkpoint as ``siftune train`` loads it
(a classifier gets a fresh, seeded head); the "random" model is the same
architecture built from the same config with seeded random weights.
Both are analysed in eval mode, so dropout does not make the numbers
depend on a random draw.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..recipes import data, models
from ..recipes.loss import batch_loss
from ..errors import ConfigError, DataError

# Characters that make a single --target-modules value a regex rather than a module name.
_REGEX_CHARACTERS = "*^$|("


@dataclass
class AnalysisArgs:
    """Arguments shared by ``siftune analyze gradients`` and ``siftune analyze landscape``.

    Args:
        model: model name or local folder ("minilm", "smollm2" are built in).
        dataset: built-in name ("rotten_tomatoes", "chatterbot"), a .csv/.jsonl/.parquet
            file or a folder written by datasets' save_to_disk.
        task: "classification" or "causal_lm"; default: the built-in dataset's task,
            else classification.
        batches: how many batches of the shuffled data the analysis uses.
        batch_size: examples per batch.
        max_length: tokens per example; longer examples are cut.
        random_init: also analyse the same architecture with random weights.
        target_modules: module names (or one regex) whose weights are analysed;
            the default depends on the analysis.
        seed: data order, new classification heads, random weights, directions.
        threads: torch CPU threads (default: torch's own choice); on a busy machine
            one thread can be several times faster than two.
        output_dir: folder for the JSON, figures and markdown report.
        text_column: column of a user file holding the text (default: text, else sentence).
        label_column: column of a user file holding the class label (default: label).
        prompt_column: column of a user file holding the prompt (default: prompt, else instruction).
        response_column: column of a user file holding the response (default: response, else output).
    """

    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    task: str | None = field(default=None, metadata={
        "help": "classification or causal_lm (default: the built-in dataset's task, else classification)"})
    batches: int = field(default=4, metadata={"help": "batches of the shuffled data to use (default: 4)"})
    batch_size: int = 16
    max_length: int = 64
    random_init: bool = field(default=True, metadata={
        "help": "also analyse the same architecture with random weights (default: on)"})
    target_modules: list[str] | str | None = None
    seed: int = 0
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    output_dir: str = "runs/analysis"
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None

    def __post_init__(self):
        if self.task is None:
            builtin = data.BUILTIN_DATASETS.get(self.dataset)
            self.task = builtin["task"] if builtin else "classification"
        patterns = self.target_modules
        if isinstance(patterns, list) and len(patterns) == 1 and any(c in patterns[0] for c in _REGEX_CHARACTERS):
            self.target_modules = patterns[0]

    def validate(self) -> None:
        """ConfigError naming the argument for every value no analysis could use."""
        if self.task not in data.TASKS:
            raise ConfigError(f"task must be one of {', '.join(data.TASKS)}, got {self.task!r}")
        for name in ("batches", "batch_size", "max_length", "threads"):
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")

    def setup(self) -> dict:
        """The arguments as recorded in the output JSON."""
        return {
            "model": self.model, "dataset": self.dataset, "task": self.task, "batch_size": self.batch_size,
            "max_length": self.max_length, "target_modules": self.target_modules, "seed": self.seed,
            "threads": torch.get_num_threads(),
        }


def pretrained_and_batches(args: AnalysisArgs):
    """``(model, batches)``: the checkpoint for the task in eval mode, and the fixed batches.

    Sets torch's thread count first when ``args.threads`` asks for one.
    The batches are the first ``args.batches`` of the seeded shuffle of the
    dataset (fewer if the data runs out).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    examples = task_examples(args)
    labels = data.label_names(examples) if args.task == "classification" else None
    # The seed fixes the fresh classification head.
    torch.manual_seed(args.seed)
    model, tokenizer = models.load_model(args.model, args.task, num_labels=len(labels) if labels else None,
                                         labels=labels)
    if args.task == "classification":
        stream = data.classification_batches(examples, tokenizer, labels, args.batch_size, args.max_length,
                                             shuffle=True, seed=args.seed, source=args.dataset)
    else:
        stream = data.causal_lm_batches(examples, tokenizer, args.batch_size, args.max_length,
                                        shuffle=True, seed=args.seed)
    batches = list(itertools.islice(stream, args.batches))
    if not batches:
        raise DataError(f"{args.dataset} has no examples to analyse; pass a dataset with at least one row")
    return model.eval(), batches


def random_twin(model, task: str, seed: int):
    """The same architecture and config as ``model``, with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    torch.manual_seed(seed)
    return auto_class.from_config(model.config).to(device=model.device, dtype=model.dtype).eval()


def task_examples(args: AnalysisArgs) -> list[dict]:
    """The dataset's examples for the task, read as ``siftune train`` reads them."""
    return data.load_examples(args.dataset, args.task, text_column=args.text_column,
                              label_column=args.label_column, prompt_column=args.prompt_column,
                              response_column=args.response_column)


@torch.no_grad()
def mean_loss(model, batches) -> float:
    """Mean over ``batches`` of the model's own loss on each batch (cross-entropy / response tokens)."""
    return sum(float(batch_loss(model, batch)) for batch in batches) / len(batches)
