"""Peak memory of a long second-order inner loop: plain, checkpointed (``checkpoint_steps``) and truncated.

For the four-block conv net of few-shot Omniglot (``conv4`` of ``bench_meta.py``, 28x28
inputs, 5-way 1-shot, 15 queries per class) and each number of inner steps, one task's
meta-step (adapt, query loss, backward) runs through ``MAML`` with plain second order,
with ``checkpoint_steps=True`` and, for comparison, with ``second_order_steps=1``
(truncated: a different meta-gradient). :class:`~metann.train.MetaTrainer` back-propagates
one task at a time, so this is the peak of a meta-step. Reported per configuration:
the peak tensor memory (``peak_memory`` of ``bench_meta.py``: replayed
``torch.profiler`` allocation events, float32), its ratio to plain second order, the time
of one meta-step, and the largest difference of the float64 meta-gradient from the plain
second-order one, relative to its largest entry (checkpointing must give the same
meta-gradient).

Usage::

    python benchmarks/bench_memory.py                       # 10 and 20 inner steps
    python benchmarks/bench_memory.py --steps 5,10,20 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_meta import conv4, image_tasks, peak_memory

from metann.meta import MAML

CONFIGS = {
    "plain": {},
    "checkpointed": {"checkpoint_steps": True},
    "truncated_1": {"second_order_steps": 1},
}


def evaluator(model, data):
    return F.cross_entropy(model(data[0]), data[1])


def make_step(config: str, steps: int, dtype: torch.dtype, lr: float = 0.4):
    """Return ``(model, step)``; ``step()`` is one task's meta-step with fresh gradients."""
    torch.manual_seed(0)
    model = conv4().to(dtype)
    support, query = image_tasks(1, dtype, shots=1, queries=15)[0]
    maml = MAML(model, steps_train=steps, lr=lr, evaluator=evaluator, **CONFIGS[config])

    def step():
        for p in model.parameters():
            p.grad = None
        evaluator(maml(support), query).backward()

    return model, step


def measure(config: str, steps: int) -> dict:
    model, step = make_step(config, steps, torch.float64)
    step()
    grads64 = [p.grad.clone() for p in model.parameters()]
    model, step = make_step(config, steps, torch.float32)
    step()  # warm-up: first-call allocations are not part of the steady state
    started = time.perf_counter()
    step()
    seconds = time.perf_counter() - started
    return {"grads": grads64, "peak_bytes": peak_memory(step), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,20", help="comma-separated inner-step counts")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = args.configs.split(",")
    if configs[0] != "plain":
        configs = ["plain"] + [c for c in configs if c != "plain"]
    print(f"torch {torch.__version__}, {args.threads} thread(s), conv4 5-way 1-shot 15 queries, one task per meta-step")
    header = f"{'steps':>5} {'configuration':<14} {'peak MB':>9} {'ratio':>7} {'s/step':>8}  meta-gradient vs plain (f64)"
    print(header)
    print("-" * len(header))
    results: dict[str, dict[str, dict]] = {}
    for steps in (int(s) for s in args.steps.split(",")):
        measured = {config: measure(config, steps) for config in configs}
        plain = measured["plain"]
        scale = max(g.abs().max().item() for g in plain["grads"])
        results[str(steps)] = {}
        for config, m in measured.items():
            error = max((g - p).abs().max().item() for g, p in zip(m["grads"], plain["grads"])) / scale
            ratio = m["peak_bytes"] / plain["peak_bytes"]
            same = "same" if error < 1e-6 else "differs"
            print(f"{steps:5d} {config:<14} {m['peak_bytes'] / 2**20:9.2f} {ratio:7.3f} {m['seconds']:8.2f}  "
                  f"{same} (max rel. difference {error:.1e})", flush=True)
            results[str(steps)][config] = {
                "peak_mb": m["peak_bytes"] / 2**20, "ratio": ratio, "seconds": m["seconds"], "grad_rel_diff": error,
            }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
