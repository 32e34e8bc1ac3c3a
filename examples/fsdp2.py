"""SIFT on a model sharded by FSDP2, one process per device: each rank trains its own rows' components.

    torchrun --nproc_per_node 2 examples/fsdp2.py                  # SmolLM2-135M on chat data, 20 steps
    torchrun --nproc_per_node 2 examples/fsdp2.py --model PATH --steps 2   # the tests use a tiny model

Every rank loads the same weights, shards them with ``fully_shard`` (each
transformer block, then the root), then attaches SIFT: the selection is the
global top-k one process would take from the averaged gradient, and each rank
keeps, stores and updates only its own shard's components. The increment is
gathered on every rank and written by rank 0. On CPUs the ranks talk over
gloo; on GPUs over NCCL.
"""
from __future__ import annotations

import argparse
import itertools

import torch

import siftune
from siftune.parallel import distributed, sharding
from siftune.recipes.data import causal_lm_batches, load_examples
from siftune.recipes.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="built-in name or model folder (default: smollm2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch, a multiple of the ranks")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1.6e-3)
    parser.add_argument("--output-dir", default="runs/fsdp2")
    args = parser.parse_args()

    distributed.init()  # joins the job torchrun describes
    torch.manual_seed(0)  # the same weights on every rank
    model, tokenizer = load_model(args.model, "causal_lm")
    sharding.shard_model(model)  # before attach: SIFT trains the shards
    engine = siftune.attach(model, density=args.density)
    optimizer = engine.optimizer(lr=args.lr, max_grad_norm=1.0)
    examples = load_examples("chatterbot", "causal_lm")
    epochs = (causal_lm_batches(examples, tokenizer, args.batch_size, 128, shuffle=True, seed=epoch)
              for epoch in itertools.count())
    batches = itertools.islice(itertools.chain.from_iterable(epochs), args.steps)
    with sharding.fsdp_collective_errors():  # a lost peer ends the others with one DistributedError
        for step, batch in enumerate(distributed.shard(batches)):  # each rank its slice of every batch
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            batch_loss = distributed.mean_across_ranks(loss.item())  # every rank takes part
            if distributed.is_main_process():
                print(f"step {step + 1}: loss {batch_loss:.3f}")
        increment = engine.increment(base_model=args.model)  # every rank: gathers the shards' parts
    if distributed.is_main_process():
        increment.metadata.update(task="causal_lm")
        increment.save(args.output_dir)
        print(f"{increment.num_components:,} components trained over {distributed.world_size()} ranks; "
              f"increment in {args.output_dir}/")
    distributed.wait_for_all()  # leave together: none tears down its connections while rank 0 still saves
    distributed.cleanup()


if __name__ == "__main__":
    main()
