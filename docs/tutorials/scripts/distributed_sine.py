"""Meta-train MAML on sinusoid regression on every process that torchrun starts.

Run on two CPU processes (add ``--nnodes``/``--rdzv-endpoint`` for several machines)::

    torchrun --nproc_per_node=2 docs/tutorials/scripts/distributed_sine.py --out runs/sine-ddp

Every rank builds the same model and a sampler with the same seed; MetaTrainer
gives each rank its share of every meta-batch and sums the meta-gradients with one
``all_reduce``, so the run takes the same steps as one process would.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from metann.data import SinusoidTaskSampler
from metann.meta import MAML, default_evaluator_regression
from metann.train import MetaTrainer


def main(iterations: int = 1000, meta_batch_size: int = 20, out: str = "runs/sine-ddp") -> MetaTrainer:
    """Join the process group that torchrun describes, meta-train, leave the group."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from torchrun
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.manual_seed(0)  # the same initial model everywhere (MetaTrainer also broadcasts rank 0's)
        net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        maml = MAML(net.to(device), steps_train=1, steps_eval=10, lr=0.01, evaluator=default_evaluator_regression)
        sampler = SinusoidTaskSampler(seed=0, device=device)  # the same seed on every rank
        held_out = SinusoidTaskSampler(seed=1, device=device).sample(20)
        trainer = MetaTrainer(
            maml,
            torch.optim.Adam(maml.parameters(), lr=1e-3),
            sampler,
            metrics_path=os.path.join(out, "metrics.jsonl"),  # written by rank 0 only
            progress=False,
        )
        trainer.fit(
            iterations,
            meta_batch_size,  # the global meta-batch, shared out over the ranks
            eval_every=max(1, iterations // 4),
            eval_tasks=held_out,
            checkpoint_dir=out,  # rank 0 writes checkpoint.pt; rerun with resume=True to continue
            resume=True,
        )
        if trainer.is_main:
            print(f"{trainer.world_size} processes, {trainer.iteration} iterations, "
                  f"held-out MSE after adaptation {trainer.history.eval_loss[-1]:.3f}")
        return trainer
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--meta-batch", type=int, default=20)
    parser.add_argument("--out", default="runs/sine-ddp")
    args = parser.parse_args()
    main(args.iterations, args.meta_batch, args.out)
