"""SIFT beside a 4-bit base, as QLoRA trains beside one: SmolLM2-135M-Instruct in nf4 on chat data.

    python examples/nf4_base.py                      # 40 steps of 8, writes runs/nf4-base/
    python examples/nf4_base.py --model PATH --steps 2   # any causal LM folder (the tests use a tiny one)

The targeted projections are loaded as bitsandbytes nf4 ``Linear4bit`` layers
and stay frozen; ``storage="delta"`` trains the selected components' values
beside them (a forward hook adds them to each layer's output). The increment
is the same file as any other: it records the quantization, so
``SparseIncrement.load_base()`` rebuilds the base it was trained beside.
Needs ``pip install 'siftune[quant]'``.
"""
from __future__ import annotations

import argparse
import itertools

import torch

import siftune
from siftune.recipes.data import causal_lm_batches, load_examples, split_examples
from siftune.recipes.models import load_model


def mean_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(model(**batch).loss) for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="built-in name or model folder (default: smollm2)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.023)
    parser.add_argument("--lr", type=float, default=1.6e-3)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--output-dir", default="runs/nf4-base")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, "causal_lm", quantize="nf4")
    train_set, eval_set = split_examples(load_examples("chatterbot", "causal_lm"), args.eval_size, seed=0)

    def batches(examples, shuffle, seed=0):
        return causal_lm_batches(examples, tokenizer, args.batch_size, 128, shuffle=shuffle, seed=seed)

    before = mean_loss(model, batches(eval_set, shuffle=False))
    engine = siftune.attach(model, density=args.density, storage="delta")  # the 4-bit weights stay as they are
    optimizer = engine.optimizer(lr=args.lr, max_grad_norm=1.0)
    epochs = (batches(train_set, shuffle=True, seed=epoch) for epoch in itertools.count())
    for batch in itertools.islice(itertools.chain.from_iterable(epochs), args.steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = mean_loss(model, batches(eval_set, shuffle=False))

    increment = engine.increment(base_model=args.model, values=optimizer.master_values())
    increment.metadata.update(task="causal_lm", quantize="nf4")  # load_base() dequantizes the same base
    increment.save(args.output_dir)
    print(f"held-out response loss {before:.3f} -> {after:.3f}; {engine.num_selected:,} components trained "
          f"beside the nf4 weights; increment in {args.output_dir}/")


if __name__ == "__main__":
    main()
