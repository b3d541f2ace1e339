"""Time forward+backward of small MLPs through `Learner.functional`, `functional_call` and by hand.

The engine's promise is that a stateless call costs about as much as hand-written
functional code: `Learner.functional` should be no slower than
`torch.func.functional_call` and within 1.10x of the hand-written version.

Method (see ../shared/PYTORCH_NOTES.md, "Measuring on these machines"): each
implementation runs in its own worker process (``OMP_WAIT_POLICY=PASSIVE``,
``torch.set_num_threads(1)``) that stays alive for the whole run. Round after round,
the parent asks the workers in turn (rotating the order) to time a batch of steps after
a warm-up; each batch is split into chunks run A B C A B C ..., so slow phases of a
shared machine hit every implementation alike. The
report gives the median time per step over the rounds and the ratio of each median to
the hand-written reference of the same run (the JSON also has the median of the
per-round ratios), measured both as thread CPU time, which a busy shared machine
disturbs little, and as wall time. Before timing, the three implementations' outputs and gradients are
checked to agree.

A step is ``torch.autograd.grad(mse(f(params, x), y), params)``, the inner step of MAML.

Usage::

    python benchmarks/bench_engine.py                       # both sizes, 7 rounds
    python benchmarks/bench_engine.py --rounds 5 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metann import Learner

SIZES = {
    # name: (layer widths, points per task, steps timed per round)
    "sine 1-40-40-1 x10": ([1, 40, 40, 1], 10, 3000),
    "mnist 784-256-10 x25": ([784, 256, 10], 25, 2000),
}
IMPLS = ("hand-written", "functional_call", "Learner.functional")
WARMUP = 200  # steps before the first chunk of a round; a tenth of it before the others
CHUNKS = 10  # each round's batch per implementation is run in this many interleaved chunks


# ----------------------------------------------------------------------------- workloads
def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def hand_forward(params: list[Tensor], x: Tensor) -> Tensor:
    h = x
    n = len(params) // 2
    for i in range(n):
        h = F.linear(h, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            h = F.relu(h)
    return h


def make_step(impl: str, size: str, dtype: torch.dtype = torch.float32):
    """Build ``step() -> (output, grads)`` for one implementation and size, with fixed data."""
    widths, points, _ = SIZES[size]
    torch.manual_seed(0)
    net = mlp(widths).to(dtype)
    x = torch.randn(points, widths[0], dtype=dtype)
    y = torch.randn(points, widths[-1], dtype=dtype)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]

    if impl == "hand-written":

        def forward() -> Tensor:
            return hand_forward(params, x)

    elif impl == "functional_call":
        names = [n for n, _ in net.named_parameters()]

        def forward() -> Tensor:
            return torch.func.functional_call(net, dict(zip(names, params)), (x,))

    elif impl == "Learner.functional":
        learner = Learner(net)

        def forward() -> Tensor:
            return learner.functional(params, True, x)

    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {list(IMPLS)}")

    def step() -> tuple[Tensor, tuple[Tensor, ...]]:
        out = forward()
        loss = F.mse_loss(out, y)
        return out, torch.autograd.grad(loss, params)

    return step


def check_agreement() -> None:
    """All implementations give the same outputs and gradients (float64)."""
    for size in SIZES:
        results = {impl: make_step(impl, size, torch.float64)() for impl in IMPLS}
        ref_out, ref_grads = results["hand-written"]
        for impl, (out, grads) in results.items():
            torch.testing.assert_close(out, ref_out, msg=f"{impl} output differs on {size}")
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, msg=f"{impl} gradient differs on {size}")


# ----------------------------------------------------------------------------- worker
def worker(impl: str) -> None:
    """Answer ``size<TAB>steps`` requests on stdin with seconds per step (thread CPU time and wall time)."""
    torch.set_num_threads(1)
    steps = {size: make_step(impl, size) for size in SIZES}
    for line in sys.stdin:
        size, count, warmup = line.rstrip("\n").split("\t")
        step = steps[size]
        for _ in range(int(warmup)):
            step()
        gc.collect()
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        for _ in range(int(count)):
            step()
        cpu, wall = time.thread_time() - start_cpu, time.perf_counter() - start_wall
        print(json.dumps({"cpu": cpu / int(count), "wall": wall / int(count)}), flush=True)


# ----------------------------------------------------------------------------- parent
def run(rounds: int, scale: float) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    workers = {
        impl: subprocess.Popen(
            [sys.executable, __file__, "--worker", impl],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for impl in IMPLS
    }
    clocks = ("cpu", "wall")
    times = {clock: {size: {impl: [] for impl in IMPLS} for size in SIZES} for clock in clocks}
    try:
        for r in range(rounds):
            order = IMPLS[r % len(IMPLS) :] + IMPLS[: r % len(IMPLS)]
            for size, (_, _, count) in SIZES.items():
                # Each implementation's batch is split into chunks run in turn (A B C A B C ...),
                # so that a slow phase of the machine within the round hits all of them alike.
                chunk = max(1, int(count * scale) // CHUNKS)
                spent = {clock: dict.fromkeys(IMPLS, 0.0) for clock in clocks}
                for c in range(CHUNKS):
                    for impl in order:
                        proc = workers[impl]
                        proc.stdin.write(f"{size}\t{chunk}\t{WARMUP if c == 0 else WARMUP // 10}\n")
                        proc.stdin.flush()
                        reply = proc.stdout.readline()
                        if not reply:
                            raise RuntimeError(f"worker {impl!r} died")
                        for clock, seconds in json.loads(reply).items():
                            spent[clock][impl] += seconds / CHUNKS
                for clock in clocks:
                    for impl in IMPLS:
                        times[clock][size][impl].append(spent[clock][impl])
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    return {clock: summarise(times[clock]) for clock in clocks}


def summarise(times: dict[str, dict[str, list[float]]]) -> dict:
    report = {}
    for size, by_impl in times.items():
        ref = by_impl["hand-written"]
        ref_median = statistics.median(ref)
        report[size] = {
            impl: {
                "median_us": statistics.median(ts) * 1e6,
                "ratio_to_hand": statistics.median(ts) / ref_median,
                "median_of_round_ratios": statistics.median(t / h for t, h in zip(ts, ref)),
                "rounds_us": [t * 1e6 for t in ts],
            }
            for impl, ts in by_impl.items()
        }
        learner = statistics.median(by_impl["Learner.functional"])
        report[size]["Learner.functional / functional_call"] = learner / statistics.median(by_impl["functional_call"])
    return report


def print_table(report: dict, rounds: int) -> None:
    print(f"forward + backward per step: median of {rounds} interleaved rounds, 1 thread, OMP_WAIT_POLICY=PASSIVE")
    print("cpu = thread CPU time (robust to a busy machine), wall = elapsed time; ratios are to hand-written")
    header = f"{'size':<22} {'implementation':<20} {'cpu us':>8} {'/ hand':>7} {'wall us':>8} {'/ hand':>7}"
    print(header)
    print("-" * len(header))
    for size in report["cpu"]:
        for impl in IMPLS:
            cpu, wall = report["cpu"][size][impl], report["wall"][size][impl]
            print(
                f"{size:<22} {impl:<20} {cpu['median_us']:>8.1f} {cpu['ratio_to_hand']:>7.3f}"
                f" {wall['median_us']:>8.1f} {wall['ratio_to_hand']:>7.3f}"
            )
        key = "Learner.functional / functional_call"
        cpu, wall = report["cpu"][size][key], report["wall"][size][key]
        print(f"{size:<22} {'Learner / funct._call':<20} {'':>8} {cpu:>7.3f} {'':>8} {wall:>7.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the steps timed per round")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if args.rounds < 1 or args.scale <= 0:
        parser.error("--rounds must be >= 1 and --scale > 0")
    check_agreement()
    print("outputs and gradients agree (float64)", file=sys.stderr)
    report = run(args.rounds, args.scale)
    print_table(report, args.rounds)
    if args.json:
        meta = {"torch": torch.__version__, "python": sys.version.split()[0], "rounds": args.rounds}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": report}, f, indent=2)


if __name__ == "__main__":
    main()
