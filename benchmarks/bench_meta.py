"""Time one MAML meta-step through metann and through hand-written references, interleaved.

Each implementation runs in its own worker process (``OMP_WAIT_POLICY=PASSIVE``, a fixed
thread count) that stays alive for the whole run; the parent asks the workers in turn
(in a new, seeded order every round) to time a batch of meta-steps, round after round,
so slow phases of this shared machine hit every implementation alike. Before timing,
every implementation's meta-gradient is compared with a float64 hand-written reference.
The report gives the median time per meta-step, the time ratio to the hand-written
reference (the median over rounds of the ratio within a round, with its quartiles), and
the peak tensor memory of one meta-step (from ``torch.profiler`` allocation events,
measured after the timed rounds so that the profiler cannot affect them).

Usage::

    python benchmarks/bench_meta.py                      # every workload, 7 rounds
    python benchmarks/bench_meta.py --workloads sine2 --rounds 5 --json out.json
    python benchmarks/bench_meta.py --workloads sine1 --impls hand,hand@2,metann   # noise floor
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- workloads


def conv4(ways: int = 5) -> nn.Sequential:
    """The four-block conv net of few-shot Omniglot (64 filters, batch statistics)."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [
            nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def conv4_forward(params, x):
    h = x
    for i in range(4):
        w, b, gamma, beta = params[4 * i : 4 * i + 4]
        h = F.conv2d(h, w, b, padding=1)
        h = F.batch_norm(h, None, None, gamma, beta, training=True)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), params[16], params[17])


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_forward(params, x):
    h = x
    n = len(params) // 2
    for i in range(n):
        h = F.linear(h, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            h = F.relu(h)
    return h


def sine_tasks(n_tasks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        amp = torch.rand((), generator=g) * 4.9 + 0.1
        phase = torch.rand((), generator=g) * torch.pi
        x = torch.rand(20, 1, generator=g) * 10 - 5
        y = amp * torch.sin(x + phase)
        x, y = x.to(dtype), y.to(dtype)
        tasks.append(((x[:10], y[:10]), (x[10:], y[10:])))
    return tasks


def image_tasks(n_tasks, dtype, shots, queries, ways=5, seed=0, size=28):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        xs = torch.randn(ways * shots, 1, size, size, generator=g).to(dtype)
        xq = torch.randn(ways * queries, 1, size, size, generator=g).to(dtype)
        ys = torch.arange(ways).repeat_interleave(shots)
        yq = torch.arange(ways).repeat_interleave(queries)
        tasks.append(((xs, ys), (xq, yq)))
    return tasks


def flat_tasks(n_tasks, dtype, shots, queries, ways=5, seed=0):
    return [((xs.flatten(1), ys), (xq.flatten(1), yq)) for (xs, ys), (xq, yq) in image_tasks(n_tasks, dtype, shots, queries, ways, seed)]


WORKLOADS = {
    # name: (model factory, functional forward, tasks(dtype), loss, inner steps, first order, inner lr)
    "sine2": (lambda: mlp([1, 40, 40, 1]), mlp_forward, lambda d: sine_tasks(25, d), F.mse_loss, 5, False, 0.01),
    "sine1": (lambda: mlp([1, 40, 40, 1]), mlp_forward, lambda d: sine_tasks(25, d), F.mse_loss, 5, True, 0.01),
    "conv4_1step": (conv4, conv4_forward, lambda d: image_tasks(4, d, 1, 15), F.cross_entropy, 1, False, 0.4),
    "conv4_5step": (conv4, conv4_forward, lambda d: image_tasks(4, d, 1, 15), F.cross_entropy, 5, False, 0.4),
    "wide": (lambda: mlp([784, 1024, 1024, 10]), mlp_forward, lambda d: flat_tasks(4, d, 5, 15), F.cross_entropy, 1, False, 0.1),
}

# ----------------------------------------------------------------------------- implementations


def make_step(impl: str, workload: str, dtype: torch.dtype):
    """Return ``(model, step)``: ``step()`` runs one meta-step (forward over all tasks and backward).

    ``impl@tag`` is ``impl`` in another worker process: ``--impls hand,hand@2,...`` shows
    how far two processes running the same code drift apart on this machine.
    """
    impl = impl.partition("@")[0]
    make, forward, tasks_of, loss_fn, steps, first_order, lr = WORKLOADS[workload]
    torch.manual_seed(0)
    model = make().to(dtype)
    tasks = tasks_of(dtype)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    create_graph = not first_order

    if impl == "hand":

        def step():
            total = 0.0
            for (xs, ys), (xq, yq) in tasks:
                fast = params
                for _ in range(steps):
                    grads = torch.autograd.grad(loss_fn(forward(fast, xs), ys), fast, create_graph=create_graph)
                    fast = [p - lr * g for p, g in zip(fast, grads)]
                total = total + loss_fn(forward(fast, xq), yq)
            (total / len(tasks)).backward()

    elif impl == "functional_call":
        call = torch.func.functional_call

        def step():
            total = 0.0
            for (xs, ys), (xq, yq) in tasks:
                fast = dict(zip(names, params))
                for _ in range(steps):
                    loss = loss_fn(call(model, fast, (xs,)), ys)
                    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
                    fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
                total = total + loss_fn(call(model, fast, (xq,)), yq)
            (total / len(tasks)).backward()

    elif impl == "metann":
        from metann.meta import MAML

        maml = MAML(model, steps_train=steps, lr=lr, first_order=first_order, evaluator=lambda m, d: loss_fn(m(d[0]), d[1]))

        def step():
            total = 0.0
            for support, (xq, yq) in tasks:
                total = total + loss_fn(maml(support)(xq), yq)
            (total / len(tasks)).backward()

    elif impl == "vmap":  # the torch.func recipe: vmap over tasks, torch.func.grad inner steps
        call, grad, vmap = torch.func.functional_call, torch.func.grad, torch.func.vmap
        stacked = [torch.stack(c) for c in zip(*[(*s, *q) for s, q in tasks])]

        def inner_loss(fast, x, y):
            return loss_fn(call(model, fast, (x,)), y)

        def task_loss(xs, ys, xq, yq):
            fast = dict(zip(names, params))
            for _ in range(steps):
                grads = grad(inner_loss)(fast, xs, ys)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                fast = {n: p - lr * grads[n] for n, p in fast.items()}
            return loss_fn(call(model, fast, (xq,)), yq)

        def step():
            vmap(task_loss)(*stacked).mean().backward()

    elif impl == "metann_batched":
        from metann.meta import MAML

        maml = MAML(model, steps_train=steps, lr=lr, first_order=first_order, evaluator=lambda m, d: loss_fn(m(d[0]), d[1]))
        maml.batched(tasks)  # refuses (ValueError) where vmap is known to be wrong

        def step():
            maml.batched(tasks).mean().backward()

    else:
        raise SystemExit(f"unknown implementation {impl!r}")

    def meta_step():
        for p in params:
            p.grad = None
        step()

    return model, meta_step


def peak_memory(step) -> int:
    """Peak bytes of tensors allocated during one ``step()``, from profiler allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each op's own allocations are its `self_cpu_memory_usage`; frees show up as "[memory]"
    # events with negative sizes. Replaying them in time order gives the live bytes.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


# ----------------------------------------------------------------------------- worker side

# glibc's malloc returns freed memory at the top of its heap to the system once more
# than a (self-adjusting) threshold is free, and the next meta-step faults it back in
# page by page: 20-30 thousand minor page faults (5-10% of the time) per conv-4 step,
# varying with the order of allocations, which differs between implementations and
# even between processes. The workers keep their memory instead (blocks up to 32 MB
# from the heap, no trimming), unless `--default-malloc`; faults per step are reported.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(impl: str, workload: str, threads: int) -> None:
    torch.set_num_threads(threads)
    grads_file = sys.stdin.readline().strip()
    out = {}
    try:
        make_step(impl, workload, torch.float32)
    except ValueError as err:  # the implementation refuses this workload
        print(json.dumps({"refused": str(err)}), flush=True)
        return
    if grads_file != "-":  # "-": a further process of this implementation, timed only
        for dtype in (torch.float64, torch.float32):
            model, step = make_step(impl, workload, dtype)
            step()
            out[str(dtype)] = [p.grad.detach().clone() for p in model.parameters()]
        torch.save(out, grads_file)
    model, step = make_step(impl, workload, torch.float32)
    step()
    step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "memory":  # last: the profiler leaves nothing behind in the timed steps
            print(json.dumps({"peak_bytes": peak_memory(step)}), flush=True)
            return
        iterations = int(line)
        faults, start = _page_faults(), time.perf_counter()
        for _ in range(iterations):
            step()
        seconds, faults = time.perf_counter() - start, _page_faults() - faults
        print(json.dumps({"seconds": seconds / iterations, "faults": faults / iterations}), flush=True)


# ----------------------------------------------------------------------------- parent side


def check_gradients(files: dict[str, str], reference: str = "hand") -> dict[str, float]:
    """Largest error of each implementation's float32 meta-gradient, relative to the float64 reference's size.

    The float32 round-off of the hand-written reference sets the bar: an implementation
    passes when its error is within 10x of the reference's own float32 error.
    """
    truth = torch.load(files[reference], weights_only=True)[str(torch.float64)]
    scale = max(t.abs().max().item() for t in truth)
    errors = {}
    for impl, path in files.items():
        grads = torch.load(path, weights_only=True)
        err64 = max((g - t).abs().max().item() for g, t in zip(grads[str(torch.float64)], truth)) / scale
        err32 = max((g.double() - t).abs().max().item() for g, t in zip(grads[str(torch.float32)], truth)) / scale
        errors[impl] = {"float64": err64, "float32": err32}
    bar = max(errors[reference]["float32"] * 10, 1e-5)
    for err in errors.values():
        err["ok"] = err["float64"] < 1e-9 and err["float32"] <= bar
    return errors


def run_workload(
    workload: str, impls: list[str], rounds: int, seconds: float, threads: int, processes: int, pin_malloc: bool
) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    if pin_malloc:
        env.update(PINNED_MALLOC)
    tmp = tempfile.mkdtemp(prefix="metann-bench-")
    procs, files, memory = {}, {}, {}
    log = open(os.path.join(tmp, "workers.log"), "w")  # noqa: SIM115 -- closed in `finally`; the profiler is chatty
    for impl in impls:
        files[impl] = os.path.join(tmp, f"{impl}.pt")
        for k in range(processes):  # process 0 also checks the gradient and measures memory
            procs[impl, k] = proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", impl, "--workloads", workload, "--threads", str(threads)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
            )
            proc.stdin.write((files[impl] if k == 0 else "-") + "\n")
            proc.stdin.flush()

    def ask(impl: str, k: int, line: str) -> dict:
        procs[impl, k].stdin.write(line + "\n")
        procs[impl, k].stdin.flush()
        return json.loads(procs[impl, k].stdout.readline())

    try:
        answers = {key: json.loads(proc.stdout.readline()) for key, proc in procs.items()}
        refused = {impl: answers[impl, 0]["refused"] for impl in impls if "refused" in answers[impl, 0]}
        timed = [impl for impl in impls if impl not in refused]
        errors = check_gradients({impl: files[impl] for impl in timed})
        # Calibrate: iterations per batch so that a batch of the reference takes about `seconds`.
        iterations = max(1, int(seconds / max(ask("hand", 0, "1")["seconds"], 1e-6)))
        times: dict[str, list[float]] = {impl: [] for impl in timed}
        faults: dict[str, list[float]] = {impl: [] for impl in timed}
        for r in range(rounds):
            # A new order every round (seeded: the same in every run), so no implementation
            # always follows the same neighbour or runs twice in a row at round boundaries;
            # the rounds go round the processes of each implementation.
            for impl in random.Random(r).sample(timed, len(timed)):
                answer = ask(impl, r % processes, str(iterations))
                times[impl].append(answer["seconds"])
                faults[impl].append(answer["faults"])
        for impl in timed:
            memory[impl] = ask(impl, 0, "memory")["peak_bytes"]
    finally:
        for proc in procs.values():
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait(timeout=60)
        log.close()
    medians = {impl: statistics.median(t) for impl, t in times.items()}
    # Paired: each round's time over the reference's time in the same round, so that the
    # machine's slow and fast phases cancel; the median and quartiles over the rounds.
    paired = {impl: [a / b for a, b in zip(t, times["hand"])] for impl, t in times.items()}
    quartiles = {impl: statistics.quantiles(r, n=4) if len(r) > 1 else r * 3 for impl, r in paired.items()}
    return {
        impl: {"refused": refused[impl]}
        if impl in refused
        else {
            "median_ms": medians[impl] * 1e3,
            "ratio": statistics.median(paired[impl]),
            "ratio_quartiles": [quartiles[impl][0], quartiles[impl][2]],
            "peak_mb": memory[impl] / 2**20,
            "memory_ratio": memory[impl] / memory["hand"] if memory["hand"] else float("nan"),
            "page_faults_per_step": statistics.median(faults[impl]),
            "grad_error": errors[impl],
        }
        for impl in impls  # in the order asked for
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--impls", default="hand,functional_call,vmap,metann,metann_batched")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="target seconds per timed batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--processes", type=int, default=1,
        help="worker processes per implementation, timed in turn (a process's memory layout can shift its speed)",
    )
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="leave glibc's malloc settings alone (by default the workers keep freed memory: fewer page faults, less noise)",
    )
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.workloads, args.threads)
    impls = args.impls.split(",")
    if impls[0] != "hand":
        impls = ["hand"] + [i for i in impls if i != "hand"]
    results = {}
    load_before = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds; "
        "median per meta-step, median (quartiles) of the per-round ratio to `hand`"
    )
    header = (
        f"{'workload':<12} {'implementation':<16} {'ms/step':>9} {'ratio':>7} {'quartiles':>13} "
        f"{'peak MB':>9} {'mem ratio':>9} {'faults':>7}  gradient"
    )
    print(header)
    print("-" * len(header))
    for workload in args.workloads.split(","):
        results[workload] = run_workload(
            workload, impls, args.rounds, args.seconds, args.threads, args.processes, not args.default_malloc
        )
        for impl, r in results[workload].items():
            if "refused" in r:
                print(f"{workload:<12} {impl:<16} refused: {r['refused'][:90]}", flush=True)
                continue
            e = r["grad_error"]
            verdict = "ok" if e["ok"] else "WRONG"
            print(
                f"{workload:<12} {impl:<16} {r['median_ms']:9.2f} {r['ratio']:7.3f} "
                f"{r['ratio_quartiles'][0]:6.3f}-{r['ratio_quartiles'][1]:<6.3f} {r['peak_mb']:9.2f} "
                f"{r['memory_ratio']:9.3f} {r['page_faults_per_step']:7.0f}  {verdict} (f64 {e['float64']:.1e}, f32 {e['float32']:.1e})",
                flush=True,
            )
    if args.json:
        run = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rounds": args.rounds,
            "processes": args.processes,
            "malloc": "glibc defaults" if args.default_malloc else PINNED_MALLOC,
            # 1-minute load average of the machine before and after: other jobs slow every implementation alike.
            "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "run": run, "results": results}, f, indent=2)


def _commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or ``None`` outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
