"""SIFT in your own training loop: MiniLM-L6 on Rotten Tomatoes at 1% density, then the increment.

    python examples/python_api.py                    # 300 steps of 16, writes runs/python-api/
    python examples/python_api.py --model PATH --steps 2   # any classification model folder

Every step: a forward and backward (the hooks keep only the selected gradient
entries), then the optimizer updates exactly those entries in place. The
increment holds the changed components and the new classification head.
"""
from __future__ import annotations

import argparse
import itertools

import torch

import siftune
from siftune.recipes.data import classification_batches, label_names, load_examples, split_examples
from siftune.recipes.models import load_model


def accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in batches:
            right += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    model.train()
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="built-in name or model folder (default: minilm)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--output-dir", default="runs/python-api")
    args = parser.parse_args()

    torch.manual_seed(0)
    train_set, eval_set = split_examples(load_examples("rotten_tomatoes", "classification"), args.eval_size, seed=0)
    labels = label_names(train_set)
    model, tokenizer = load_model(args.model, "classification", num_labels=len(labels), labels=labels)

    def batches(examples, shuffle, seed=0):
        return classification_batches(examples, tokenizer, labels, args.batch_size, 64, shuffle=shuffle, seed=seed)

    before = accuracy(model, batches(eval_set, shuffle=False))
    engine = siftune.attach(model, density=args.density, dense_modules=["classifier"])
    optimizer = engine.optimizer(lr=args.lr, max_grad_norm=1.0)
    epochs = (batches(train_set, shuffle=True, seed=epoch) for epoch in itertools.count())
    for batch in itertools.islice(itertools.chain.from_iterable(epochs), args.steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = accuracy(model, batches(eval_set, shuffle=False))

    increment = engine.increment(base_model=args.model, values=optimizer.master_values())
    increment.metadata.update(task="classification", labels=labels)  # so that load_base() rebuilds the head
    increment.save(args.output_dir)
    print(f"held-out accuracy {before:.3f} -> {after:.3f}; {engine.num_selected:,} components selected; "
          f"increment and model card in {args.output_dir}/")


if __name__ == "__main__":
    main()
