"""The `metann` command: meta-train on sinusoid regression or few-shot classification from the shell.

``metann sine`` and ``metann fewshot`` each build a model, meta-train it with
:class:`~metann.train.MetaTrainer`, evaluate it on held-out tasks and write into
``--out``: ``metrics.jsonl`` (one strict-JSON record per iteration and per
evaluation), ``summary.json`` (held-out results with 95% confidence intervals,
the settings, timing and versions), ``checkpoint.pt``, ``settings.json`` (what
``--resume`` checks against) and a figure (``sine.png`` or ``accuracy.png``).
Progress goes to stderr, a short summary to stdout.

Exit status: 0 on success; 2 for a usage error (bad argument, missing data
folder, a checkpoint that does not fit), reported as one ``metann: error:`` line;
130 when stopped by SIGINT/SIGTERM (a checkpoint is written first: continue with
the same command plus ``--resume``). Without matplotlib (the ``plot`` extra) the
figure is skipped with a warning and everything else is written.

Threads: ``--threads`` (default 1) calls :func:`torch.set_num_threads`. Small models
run fastest on one thread, and OpenMP worker threads spin-wait between parallel
regions, which is very slow when other processes share the cores. Set
``OMP_WAIT_POLICY=PASSIVE`` in the environment *before* starting ``metann`` when
you use more threads: the OpenMP runtime reads it once, when torch is loaded, which
happens before this module runs (setting it here was measured to have no effect).

Defaults (measured on a 2-core CPU machine, torch 2.13, one thread): ``metann sine``
runs 3000 second-order MAML iterations of 10 tasks (inner lr 0.01, one inner step,
Adam 3e-3) in about 80 s (about 220 s with the other core and more busy), and reaches
a held-out 10-shot MSE of about 0.2 after 10 steps (3.0 before). ``metann fewshot``
(Glyphs at 16x16, 5-way 1-shot, 200 iterations of 4 tasks, inner lr 0.4) takes about
4 minutes including the baseline, with validation accuracy about 0.87 (baseline
about 0.92). ``--algo metasgd`` evaluates with ``--inner-steps`` steps by default:
its learned rates fit that many steps, and ten of them diverge.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank joins a process group (``gloo``
on CPU, ``nccl`` with ``cuda:LOCAL_RANK`` on CUDA), uses the same seed, takes its
share of every meta-batch, and only rank 0 writes files and prints.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metann._version import __version__
from metann.data import FewShotSampler, Glyphs, Omniglot, SinusoidTaskSampler, split_classes
from metann.meta import ANIL, MAML, MetaSGD, default_evaluator_classification, default_evaluator_regression
from metann.train import CHECKPOINT_NAME, CheckpointError, MetaTrainer

__all__ = ["build_parser", "main"]

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil")
EVAL_SEED_OFFSET = 1_000_003  # held-out tasks come from their own stream, never the training one
METRICS, SUMMARY, SETTINGS = "metrics.jsonl", "summary.json", "settings.json"
# Settings that change the training trajectory: `--resume` refuses a run started with other values.
_TRAJECTORY = ("command", "algo", "shots", "queries", "ways", "inner_steps", "inner_lr", "meta_lr", "meta_batch",
               "seed", "dataset", "root", "classes", "image_size", "hidden")
_SINE_DEFAULTS = {"out": os.path.join("runs", "sine"), "shots": 10, "queries": 10, "inner_steps": 1, "eval_steps": 10,
                  "inner_lr": 0.01, "meta_lr": 3e-3, "meta_batch": 10, "iterations": 3000, "eval_tasks": 200,
                  "validations": 10}
_FEWSHOT_DEFAULTS = {"out": os.path.join("runs", "fewshot"), "shots": 1, "queries": 15, "inner_steps": 1,
                     "eval_steps": 3, "inner_lr": 0.4, "meta_lr": 1e-3, "meta_batch": 4, "iterations": 200,
                     "eval_tasks": 100, "validations": 5}


class UsageError(Exception):
    """A problem the user can fix on the command line: reported as one line, exit status 2."""


def _error(message: str) -> None:
    print(f"metann: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"metann: warning: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """``argparse`` with a one-line error: ``metann: error: ...`` and exit status 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"metann: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------- argument types
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try 'cpu' or 'cuda')") from None


def _add_common(p: argparse.ArgumentParser, defaults: dict[str, Any], what: str) -> None:
    d = defaults
    p.add_argument("--algo", choices=ALGORITHMS, default="maml",
                   help="maml (second order), fomaml (first order), metasgd (learned inner rates) or anil "
                        "(only the last layer adapts) (default: %(default)s)")
    p.add_argument("--shots", type=_int_at_least(1), metavar="N", default=d["shots"],
                   help=f"support examples {what} (default: %(default)s)")
    p.add_argument("--queries", type=_int_at_least(1), metavar="N", default=d["queries"],
                   help=f"query examples {what} during meta-training (default: %(default)s)")
    p.add_argument("--inner-steps", type=_int_at_least(0), metavar="N", default=d["inner_steps"],
                   help="inner-loop steps during meta-training (default: %(default)s)")
    p.add_argument("--eval-steps", type=_int_at_least(0), metavar="N", default=None,
                   help=f"inner-loop steps when adapting to held-out tasks (default: {d['eval_steps']}; for metasgd "
                        "--inner-steps, since its learned rates are tuned for that many steps and diverge beyond)")
    p.add_argument("--inner-lr", type=_positive_float, metavar="LR", default=d["inner_lr"],
                   help="inner-loop learning rate (metasgd: its initial value) (default: %(default)s)")
    p.add_argument("--meta-lr", type=_positive_float, metavar="LR", default=d["meta_lr"],
                   help="Adam learning rate of the outer loop (default: %(default)s)")
    p.add_argument("--meta-batch", type=_int_at_least(1), metavar="N", default=d["meta_batch"],
                   help="tasks per meta-step (default: %(default)s)")
    p.add_argument("--iterations", type=_int_at_least(0), metavar="N", default=d["iterations"],
                   help="total meta-steps; with --resume, training continues up to this number (default: %(default)s)")
    p.add_argument("--eval-tasks", type=_int_at_least(1), metavar="N", default=d["eval_tasks"],
                   help="held-out tasks for validation and the final summary (default: %(default)s)")
    p.add_argument("--eval-every", type=_int_at_least(1), metavar="N", default=None,
                   help=f"iterations between validations during training (default: {d['validations']} per run)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of the model and the task streams (default: %(default)s)")
    p.add_argument("--device", type=_device, metavar="DEVICE", default=torch.device("cpu"),
                   help="torch device; under torchrun 'cuda' means cuda:LOCAL_RANK (default: cpu)")
    p.add_argument("--threads", type=_int_at_least(1), metavar="N", default=1,
                   help="torch.set_num_threads; more than 1 needs OMP_WAIT_POLICY=PASSIVE set before starting "
                        "when the cores are shared (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", default=d["out"], help="output folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (same settings); without it the run starts afresh")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="do not draw the figure (which needs matplotlib, the plot extra)")
    p.add_argument("--checkpoint-every", type=_int_at_least(1), metavar="N", default=None,
                   help="iterations between checkpoints (default: only at the end and when stopped)")


def build_parser() -> argparse.ArgumentParser:
    """The ``metann`` argument parser with its ``sine`` and ``fewshot`` subcommands."""
    parser = _Parser(prog="metann", description="Meta-learning with metann: train and evaluate from the shell.",
                     epilog="Run 'metann COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"metann {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sine = commands.add_parser(
        "sine", help="meta-train an MLP on sinusoid regression (no data needed)",
        description="Meta-train a 1-40-40-1 ReLU MLP on sinusoid regression y = A sin(x + phase) and plot "
                    "held-out tasks before and after adaptation (sine.png).")
    _add_common(sine, _SINE_DEFAULTS, "per task")
    sine.set_defaults(run=_run_sine)
    fewshot = commands.add_parser(
        "fewshot", help="meta-train a four-block conv net on N-way K-shot classification",
        description="Meta-train the four-block conv net on N-way K-shot classification (Glyphs, generated, or "
                    "Omniglot from disk), compare with a supervised pre-trained baseline (accuracy.png).")
    _add_common(fewshot, _FEWSHOT_DEFAULTS, "per class")
    fewshot.add_argument("--ways", type=_int_at_least(2), metavar="N", default=5,
                         help="classes per task (default: %(default)s)")
    fewshot.add_argument("--dataset", choices=("glyphs", "omniglot"), default="glyphs",
                         help="glyphs: procedural, no download; omniglot: the official release in --root "
                              "(default: %(default)s)")
    fewshot.add_argument("--root", metavar="DIR", default=None,
                         help="Omniglot folder holding images_background (and images_evaluation), folders or zips")
    fewshot.add_argument("--classes", type=_int_at_least(2), metavar="N", default=200,
                         help="glyph classes to generate: 80%% train, 20%% validation (default: %(default)s)")
    fewshot.add_argument("--image-size", type=_int_at_least(16), metavar="N", default=16,
                         help="image side in pixels (at least 16 for four 2x2 poolings) (default: %(default)s)")
    fewshot.add_argument("--hidden", type=_int_at_least(1), metavar="N", default=64,
                         help="channels of each conv block (default: %(default)s)")
    fewshot.add_argument("--no-baseline", dest="baseline", action="store_false",
                         help="skip the supervised pre-training baseline")
    fewshot.set_defaults(run=_run_fewshot)
    return parser


# ------------------------------------------------------------------ a run: threads, device, processes, folder
class _Session:
    """Threads, device, process group and output folder of one command (rank 0 alone writes)."""

    def __init__(self, args: argparse.Namespace, figure: str) -> None:
        self.args, self.out, self.settings, self.figure = args, args.out, _settings(args), figure
        self.world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0) if self.world_size > 1 else 0
        self.device = self._pick_device(args.device)
        self.checkpoint = self.path(CHECKPOINT_NAME)
        self.resuming = bool(args.resume) and os.path.exists(self.checkpoint)
        if args.resume and not self.resuming:
            self.note(f"--resume: no checkpoint in {self.out!r} yet; starting afresh")
        if self.resuming:
            self._check_settings()
        if self.world_size > 1 and args.meta_batch < self.world_size:
            raise UsageError(f"argument --meta-batch: {args.meta_batch} tasks cannot be shared by "
                             f"{self.world_size} processes; give at least {self.world_size}")
        self.plots = bool(args.plot) and self._check_plot_extra()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def note(self, message: str) -> None:
        """A progress line on stderr (rank 0 only)."""
        if self.is_main:
            print(f"metann: {message}", file=sys.stderr, flush=True)

    def _pick_device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError("argument --device: CUDA is not available on this machine; use --device cpu")
            if self.world_size > 1:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise UsageError(f"argument --device: there is no {device} ({torch.cuda.device_count()} GPUs)")
        return device

    def _check_settings(self) -> None:
        """Refuse to resume a run that was started with settings that change its trajectory."""
        try:
            with open(self.path(SETTINGS)) as f:
                before = json.load(f)
        except (OSError, ValueError):
            return  # nothing recorded: the checkpoint's own shape checks still apply
        changed = [f"--{k.replace('_', '-')} {before[k]} (now {self.settings.get(k)})" for k in _TRAJECTORY
                   if k in before and before[k] != self.settings.get(k)]
        if changed:
            raise UsageError(f"--resume: the run in {self.out!r} was started with other settings: "
                             f"{', '.join(changed)}; repeat them or choose another --out")

    def _check_plot_extra(self) -> bool:
        from metann.plots import PLOT_EXTRA_HINT, require_matplotlib

        try:
            require_matplotlib()
        except ImportError:
            if self.is_main:
                _warn(f"{PLOT_EXTRA_HINT}. Training goes on; everything but the figure will be written.")
            return False
        return True

    def __enter__(self) -> _Session:
        torch.set_num_threads(self.args.threads)
        if self.args.threads > 1 and "OMP_WAIT_POLICY" not in os.environ and self.is_main:
            _warn("--threads > 1 without OMP_WAIT_POLICY=PASSIVE in the environment: OpenMP threads spin-wait, "
                  "which is very slow when other processes share the cores")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.is_main:
            self._prepare_folder()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _prepare_folder(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        if not self.resuming:  # a fresh run: no stale outputs of an earlier one survive it
            for name in (METRICS, SUMMARY, CHECKPOINT_NAME, self.figure):
                if os.path.exists(self.path(name)):
                    os.remove(self.path(name))
        _write_json(self.path(SETTINGS), self.settings)

    def trim_metrics(self, iteration: int) -> None:
        """Keep the metrics of the first ``iteration`` meta-steps: a resumed run logs the rest again."""
        if not self.is_main or not os.path.exists(self.path(METRICS)):
            return
        with open(self.path(METRICS)) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if _record_iteration(line) <= iteration]
        with open(self.path(METRICS), "w") as f:
            f.writelines(kept)


def _record_iteration(line: str) -> float:
    try:
        return float(json.loads(line).get("iteration", math.inf))
    except (ValueError, AttributeError, TypeError):
        return math.inf  # a torn last line of a killed run is dropped


def _finite(value: Any) -> Any:
    """The same structure with NaN and infinities as ``None``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keep = {k: v for k, v in vars(args).items() if k != "run"}
    keep["device"] = str(args.device)
    return keep


# ---------------------------------------------------------------------------- models, training, evaluation
def _algorithm(args: argparse.Namespace, model: nn.Sequential, evaluator: Callable[..., Tensor]) -> MAML:
    common = {"steps_train": args.inner_steps, "steps_eval": args.eval_steps, "lr": args.inner_lr,
              "evaluator": evaluator}
    if args.algo == "metasgd":
        return MetaSGD(model, **common)
    if args.algo == "anil":
        return ANIL(model, head=model[-1], **common)
    return MAML(model, first_order=args.algo == "fomaml", **common)


def _train(session: _Session, maml: MAML, sampler: Any, eval_tasks: list[Any]) -> MetaTrainer | None:
    """Meta-train (resuming when asked); ``None`` when stopped by a signal (a checkpoint was written)."""
    args = session.args
    optimizer = torch.optim.Adam(maml.parameters(), lr=args.meta_lr)
    trainer = MetaTrainer(maml, optimizer, sampler, device=session.device, metrics_path=session.path(METRICS),
                          log_every=max(1, args.iterations // 20))
    if session.resuming:
        try:
            trainer.load_checkpoint(session.checkpoint)
        except CheckpointError as err:
            raise UsageError(f"--resume: {err}") from err
        session.trim_metrics(trainer.iteration)
        session.note(f"resuming from iteration {trainer.iteration} of {session.checkpoint}")
    history = trainer.fit(args.iterations, args.meta_batch, eval_every=args.eval_every, eval_tasks=eval_tasks,
                          checkpoint_dir=session.out, checkpoint_every=args.checkpoint_every)
    if history.interrupted:
        session.note(f"stopped at iteration {trainer.iteration}; checkpoint written to {session.checkpoint}. "
                     "Run the same command with --resume to continue.")
        return None
    return trainer


def _gather(values: list[float]) -> list[float]:
    """Concatenate every rank's list (in rank order) in a distributed run."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def _adapted_metrics(maml: MAML, tasks: Sequence[Any], steps: int) -> dict[str, list[float]]:
    """Per-task query loss (and accuracy for classification) after ``steps`` inner steps in eval mode.

    In a distributed run the ranks share the tasks and gather the results.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    modes = [m.training for m in maml.modules()]
    maml.eval()
    loss, accuracy = [], []
    try:
        for task in list(tasks)[rank::world]:
            fast = maml.clone().adapt_on(task.support, steps)
            with torch.no_grad():
                x, y = task.query
                out = fast(x)
                if y.is_floating_point():
                    loss.append(nn.functional.mse_loss(out, y).item())
                else:
                    loss.append(nn.functional.cross_entropy(out, y).item())
                    accuracy.append((out.argmax(-1) == y).sum().item() / y.numel())
    finally:
        for m, mode in zip(maml.modules(), modes):
            m.training = mode
    return {"loss": _gather(loss), "accuracy": _gather(accuracy)}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard deviation and 95% confidence interval (mean +- 1.96 std / sqrt(n)) of per-task values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "ci95_half_width": half, "std": std, "n": n}


def _base_summary(session: _Session, trainer: MetaTrainer, started: float) -> dict[str, Any]:
    history = trainer.history
    return {
        "command": session.args.command,
        "iterations": trainer.iteration,
        "wall_time_seconds": time.perf_counter() - started,
        "training_time_seconds": history.wall_time[-1] if history.wall_time else 0.0,
        "final_meta_loss": history.meta_loss[-1] if history.meta_loss else None,
        "device": str(session.device),
        "world_size": session.world_size,
        "threads": torch.get_num_threads(),
        "metann_version": __version__,
        "torch_version": torch.__version__,
        "settings": session.settings,
    }


def _draw(session: _Session, draw: Callable[[str], None]) -> str | None:
    """Draw the command's figure into the output folder unless ``--no-plot`` or the plot extra is missing."""
    if not session.plots:
        return None
    draw(session.path(session.figure))
    return session.figure


def _finish(session: _Session, summary: dict[str, Any], figure: str | None, lines: list[str]) -> None:
    files = [METRICS, SUMMARY, CHECKPOINT_NAME, SETTINGS] + ([figure] if figure else [])
    summary["files"] = files
    _write_json(session.path(SUMMARY), summary)
    print("\n".join(lines))
    print(f"wrote {', '.join(files)} in {session.out}")


# ---------------------------------------------------------------------------- metann sine
def _mlp() -> nn.Sequential:
    """The MLP of the MAML paper's sine experiment: 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def _sine_curves(maml: MAML, tasks: Sequence[Any], amplitudes: Tensor, phases: Tensor, steps: int) -> list[dict]:
    """What ``sine.png`` shows for each task: the true curve, the support points, predictions before and after."""
    device = amplitudes.device
    grid = torch.linspace(-5.0, 5.0, 200, device=device).unsqueeze(1)
    maml.eval()
    curves = []
    for task, amplitude, phase in zip(tasks, amplitudes.tolist(), phases.tolist()):
        fast = maml.clone().adapt_on(task.support, steps)
        with torch.no_grad():
            before, after = maml.clone()(grid), fast(grid)
        x, y = task.support
        curves.append({"x": grid.flatten().tolist(), "true": (amplitude * torch.sin(grid + phase)).flatten().tolist(),
                       "before": before.flatten().tolist(), "after": after.flatten().tolist(),
                       "support_x": x.flatten().tolist(), "support_y": y.flatten().tolist(),
                       "amplitude": amplitude, "phase": phase, "steps": steps})
    return curves


def _run_sine(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _Session(args, "sine.png") as session:
        torch.manual_seed(args.seed)
        maml = _algorithm(args, _mlp(), default_evaluator_regression).to(session.device)
        sampler = SinusoidTaskSampler(k_support=args.shots, k_query=args.queries, seed=args.seed,
                                      device=session.device)
        held_out = SinusoidTaskSampler(k_support=args.shots, k_query=100, seed=args.seed + EVAL_SEED_OFFSET,
                                       device=session.device)
        eval_tasks, amplitudes, phases = held_out.sample_with_params(args.eval_tasks)
        trainer = _train(session, maml, sampler, eval_tasks)
        if trainer is None:
            return 130
        session.note(f"evaluating on {len(eval_tasks)} held-out tasks")
        pre = _stats(_adapted_metrics(maml, eval_tasks, 0)["loss"])
        post = _stats(_adapted_metrics(maml, eval_tasks, args.eval_steps)["loss"])
        if not session.is_main:
            return 0
        summary = _base_summary(session, trainer, started)
        summary.update({
            "task": {"amplitude": [0.1, 5.0], "phase": [0.0, math.pi], "x": [-5.0, 5.0]},
            "held_out": {"tasks": len(eval_tasks), "shots": args.shots, "query_points": 100,
                         "inner_steps": args.eval_steps, "seed": args.seed + EVAL_SEED_OFFSET},
            "pre_adaptation_mse": pre,
            "post_adaptation_mse": post,
        })

        def draw(path: str) -> None:
            from metann.plots import plot_sine

            curves = _sine_curves(maml, eval_tasks[:4], amplitudes[:4], phases[:4], args.eval_steps)
            title = (f"metann sine: {args.algo}, {args.shots}-shot, {trainer.iteration} meta-iterations; held-out MSE "
                     f"{pre['mean']:.3f} before, {post['mean']:.3f} after {args.eval_steps} steps")
            plot_sine(path, curves, trainer.history.to_dict(), train_steps=args.inner_steps, title=title)

        figure = _draw(session, draw)
        _finish(session, summary, figure, [
            f"metann sine: {trainer.iteration} iterations of {args.algo} in {summary['wall_time_seconds']:.1f} s "
            f"on {session.device}",
            f"held-out MSE over {pre['n']} tasks ({args.shots}-shot, 95% CI): before adaptation "
            f"{pre['mean']:.3f} +- {pre['ci95_half_width']:.3f}, after {args.eval_steps} steps "
            f"{post['mean']:.3f} +- {post['ci95_half_width']:.3f}",
        ])
    return 0


# ---------------------------------------------------------------------------- metann fewshot
def _conv4(in_channels: int, hidden: int, outputs: int, image_size: int) -> nn.Sequential:
    """The standard four-block few-shot conv net: (conv3x3, batch norm, ReLU, 2x2 max-pool) x 4, linear head.

    Batch norm uses batch statistics in train and eval mode (``track_running_stats=False``),
    as in the MAML paper: every task is its own small distribution, so running statistics
    averaged over meta-training tasks (and over half-adapted inner-loop weights) would not
    fit a new task, and evaluation would then behave unlike training. The statistics are
    those of the batch at hand (the support set during adaptation, the query set when
    predicting), and there are no buffers to update or checkpoint.
    """
    layers: list[nn.Module] = []
    for block in range(4):
        layers += [nn.Conv2d(in_channels if block == 0 else hidden, hidden, 3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    side = image_size // 16  # four 2x2 poolings with floor
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * side * side, outputs))


def _omniglot(args: argparse.Namespace) -> tuple[Any, list[int], Any, list[int]]:
    """Omniglot's background set for training; its evaluation set (or 20% of the background classes) for validation."""
    if args.root is None:
        raise UsageError("argument --dataset omniglot needs --root DIR, the folder holding images_background")
    if not os.path.isdir(args.root):
        raise UsageError(f"argument --root: no such folder: {args.root!r}")
    try:
        train = Omniglot(args.root, background=True, image_size=args.image_size)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UsageError(f"argument --root: {err}") from err
    try:
        val = Omniglot(args.root, background=False, image_size=args.image_size)
    except FileNotFoundError:
        train_classes, val_classes = split_classes(train.labels, (0.8, 0.2), seed=0)
        return train, train_classes, train, val_classes
    except (ValueError, ImportError) as err:
        raise UsageError(f"argument --root: {err}") from err
    return train, sorted(set(train.labels.tolist())), val, sorted(set(val.labels.tolist()))


def _fewshot_data(args: argparse.Namespace) -> tuple[Any, list[int], Any, list[int]]:
    """``(train_dataset, train_classes, val_dataset, val_classes)``; datasets have ``labels`` and ``ds[i]``."""
    if args.dataset == "omniglot":
        return _omniglot(args)
    if args.root is not None:
        _warn("--root is only used with --dataset omniglot")
    glyphs = Glyphs(args.classes, max(20, args.shots + args.queries), image_size=args.image_size, seed=0)
    train_classes, val_classes = split_classes(args.classes, (0.8, 0.2), seed=0)
    return glyphs, train_classes, glyphs, val_classes


def _samplers(args: argparse.Namespace, data: tuple[Any, list[int], Any, list[int]], device: torch.device) -> tuple:
    train, train_classes, val, val_classes = data
    try:
        sampler = FewShotSampler(train, None, args.ways, args.shots, args.queries, seed=args.seed,
                                 classes=train_classes, device=device)
        validation = FewShotSampler(val, None, args.ways, args.shots, args.queries, seed=args.seed + EVAL_SEED_OFFSET,
                                    classes=val_classes, device=device)
    except ValueError as err:  # fewer classes than --ways, or too few examples per class
        raise UsageError(f"cannot draw {args.ways}-way {args.shots}-shot tasks with {args.queries} queries: "
                         f"{err}") from err
    return sampler, validation


def _images(dataset: Any, index: Tensor) -> Tensor:
    stored = getattr(dataset, "images", None)
    if isinstance(stored, Tensor):
        return stored[index]
    return torch.stack([dataset[i][0] for i in index.tolist()])


def _baseline(session: _Session, data: tuple[Any, list[int], Any, list[int]], val_tasks: list[Any],
              at: Sequence[int], in_channels: int) -> dict[str, Any]:
    """The same network without meta-learning: supervised training on all training classes, then at each
    validation point fine-tuned on every validation task's support set.

    Fine-tuning replaces the head by a zero-initialised ``ways``-way linear layer and trains that head
    (the body stays as pre-trained) with the meta-learner's inner learning rate and evaluation steps:
    the "Baseline" of Chen et al. (2019). Fine-tuning the whole pre-trained network at MAML's large
    inner learning rate (0.4) wrecks its features (measured: 0.34-0.55 accuracy on Glyphs 5-way
    1-shot, against 0.75-0.86 for the head alone).
    """
    args, device = session.args, session.device
    dataset, classes = data[0], torch.tensor(data[1])
    pool = torch.nonzero(torch.isin(dataset.labels, classes)).flatten()
    relabel = torch.full((int(dataset.labels.max()) + 1,), -1, dtype=torch.long)
    relabel[classes] = torch.arange(len(classes))
    torch.manual_seed(args.seed)
    net = _conv4(in_channels, args.hidden, len(classes), args.image_size).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.meta_lr)
    generator = torch.Generator().manual_seed(args.seed)
    batch = args.meta_batch * args.ways * (args.shots + args.queries)  # the images one meta-step sees
    curve: dict[str, list] = {"iterations": [], "accuracy": [], "time": []}
    started, final = time.perf_counter(), None
    for iteration in range(max(at, default=0) + 1):
        if iteration:
            index = pool[torch.randint(len(pool), (batch,), generator=generator)]
            x, y = _images(dataset, index).to(device), relabel[dataset.labels[index]].to(device)
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if iteration in at:
            tuned = copy.deepcopy(net)
            tuned[-1] = nn.Linear(tuned[-1].in_features, args.ways).to(device)
            nn.init.zeros_(tuned[-1].weight)
            nn.init.zeros_(tuned[-1].bias)
            wrapper = ANIL(tuned, tuned[-1], steps_train=0, steps_eval=args.eval_steps, lr=args.inner_lr)
            final = _adapted_metrics(wrapper, val_tasks, args.eval_steps)["accuracy"]
            accuracy = sum(final) / len(final)
            curve["iterations"].append(iteration)
            curve["accuracy"].append(accuracy)
            curve["time"].append(time.perf_counter() - started)
            session.note(f"baseline iteration {iteration}/{max(at)}: validation accuracy {accuracy:.3f} "
                         f"after fine-tuning")
    return {"curve": curve, "final": final}


def _run_fewshot(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    data = _fewshot_data(args)  # a missing data folder or too few classes is reported before anything is written
    session = _Session(args, "accuracy.png")
    sampler, validation = _samplers(args, data, session.device)
    with session:
        in_channels = int(data[0][0][0].shape[0])
        torch.manual_seed(args.seed)
        net = _conv4(in_channels, args.hidden, args.ways, args.image_size)
        maml = _algorithm(args, net, default_evaluator_classification).to(session.device)
        eval_tasks = validation.sample(args.eval_tasks)
        trainer = _train(session, maml, sampler, eval_tasks)
        if trainer is None:
            return 130
        session.note(f"evaluating on {len(eval_tasks)} validation tasks")
        pre = _adapted_metrics(maml, eval_tasks, 0)
        post = _adapted_metrics(maml, eval_tasks, args.eval_steps)
        history = trainer.history
        times = dict(zip(history.iterations, history.wall_time))
        curves = {f"{args.algo} (meta-learned)": {
            "iterations": history.eval_iterations, "accuracy": history.eval_accuracy,
            "time": [times.get(i, 0.0) for i in history.eval_iterations]}}
        baseline = None
        if args.baseline:
            session.note("baseline: the same network, supervised pre-training, then a new head fine-tuned per task")
            baseline = _baseline(session, data, eval_tasks, history.eval_iterations, in_channels)
            curves["supervised pre-training + fine-tuned head"] = baseline["curve"]
        if not session.is_main:
            return 0
        summary = _base_summary(session, trainer, started)
        summary.update({
            "data": {"dataset": args.dataset, "train_classes": len(data[1]), "val_classes": len(data[3]),
                     "image_size": args.image_size},
            "held_out": {"tasks": len(eval_tasks), "ways": args.ways, "shots": args.shots, "queries": args.queries,
                         "inner_steps": args.eval_steps, "seed": args.seed + EVAL_SEED_OFFSET},
            "chance_accuracy": 1 / args.ways,
            "pre_adaptation_accuracy": _stats(pre["accuracy"]),
            "post_adaptation_accuracy": _stats(post["accuracy"]),
            "pre_adaptation_loss": _stats(pre["loss"]),
            "post_adaptation_loss": _stats(post["loss"]),
            "validation_curves": curves,
        })
        if baseline is not None:
            summary["baseline_post_adaptation_accuracy"] = _stats(baseline["final"])

        def draw(path: str) -> None:
            from metann.plots import plot_accuracy

            title = (f"metann fewshot: {args.dataset}, {args.ways}-way {args.shots}-shot, "
                     f"{args.eval_steps} adaptation steps, {len(eval_tasks)} validation tasks")
            plot_accuracy(path, curves, chance=1 / args.ways, title=title)

        figure = _draw(session, draw)
        post_acc = summary["post_adaptation_accuracy"]
        lines = [f"metann fewshot: {trainer.iteration} iterations of {args.algo} in "
                 f"{summary['wall_time_seconds']:.1f} s on {session.device}",
                 f"validation accuracy over {post_acc['n']} tasks ({args.ways}-way {args.shots}-shot, 95% CI): "
                 f"after {args.eval_steps} steps {post_acc['mean']:.3f} +- {post_acc['ci95_half_width']:.3f} "
                 f"(before: {summary['pre_adaptation_accuracy']['mean']:.3f})"]
        if baseline is not None:
            b = summary["baseline_post_adaptation_accuracy"]
            lines.append(f"baseline (supervised pre-training + fine-tuned head): "
                         f"{b['mean']:.3f} +- {b['ci95_half_width']:.3f}")
        _finish(session, summary, figure, lines)
    return 0


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``metann`` command; returns the exit status (0 ok, 2 usage error, 130 stopped)."""
    args = build_parser().parse_args(argv)
    defaults = _SINE_DEFAULTS if args.command == "sine" else _FEWSHOT_DEFAULTS
    if args.eval_steps is None:
        args.eval_steps = args.inner_steps if args.algo == "metasgd" else defaults["eval_steps"]
    if args.eval_every is None:
        args.eval_every = max(1, args.iterations // defaults["validations"])
    try:
        return args.run(args)
    except UsageError as err:
        _error(str(err))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
