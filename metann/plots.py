"""Figures for the `metann` command, drawn with matplotlib (the ``plot`` extra), imported only when drawn."""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PLOT_EXTRA_HINT", "plot_accuracy", "plot_sine", "require_matplotlib"]

PLOT_EXTRA_HINT = "matplotlib is not installed; install the plot extra: pip install 'metann[plot]'"


def require_matplotlib() -> None:
    """Raise ``ImportError`` naming the ``plot`` extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(PLOT_EXTRA_HINT) from err


def _figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` that needs no pyplot and no GUI backend (nothing global changes)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Write the PNG atomically: a reader never sees a half-written picture."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _smooth(values: Sequence[float | None], window: int) -> list[float]:
    """Trailing moving average over finite values, so a noisy meta-loss curve stays readable."""
    finite = [v if v is not None and math.isfinite(v) else None for v in values]
    out = []
    for end in range(1, len(finite) + 1):
        kept = [v for v in finite[max(0, end - window):end] if v is not None]
        out.append(sum(kept) / len(kept) if kept else float("nan"))
    return out


def plot_sine(path: str | os.PathLike, tasks: Sequence[Mapping[str, Any]], history: Mapping[str, Sequence[Any]],
              *, train_steps: int = 1, title: str = "") -> None:
    """Draw the classic sine-wave figure of MAML and the meta-training curve into a PNG.

    Args:
        path: Where the PNG goes.
        tasks: One mapping per held-out task with lists ``x`` (a grid), ``true``,
            ``before`` and ``after`` (predictions on the grid before and after
            adaptation), ``support_x`` and ``support_y`` (the K support points), and
            the numbers ``amplitude``, ``phase`` and ``steps`` (inner steps taken).
        history: ``iterations`` and ``meta_loss`` (one per meta-step),
            ``eval_iterations`` and ``eval_loss`` (held-out MSE after adaptation).
        train_steps: Inner steps behind each meta-loss value (for the legend).
        title: Figure title.

    Raises:
        ImportError: If matplotlib is missing (the message names the ``plot`` extra).
    """
    fig = _figure(figsize=(13, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    cells = [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]
    for k, (task, cell) in enumerate(zip(tasks, cells)):
        ax = fig.add_subplot(cell)
        ax.plot(task["x"], task["true"], color="black", lw=2, label="true function")
        ax.plot(task["x"], task["before"], color="tab:blue", ls=":", lw=1.5, label="before adaptation")
        ax.plot(task["x"], task["after"], color="tab:red", ls="--", lw=2,
                label=f"after {task['steps']} inner steps")
        ax.scatter(task["support_x"], task["support_y"], color="tab:orange", edgecolor="black", zorder=3, s=36,
                   label=f"{len(task['support_x'])} support points")
        ax.set_title(f"held-out task {k + 1}: A={task['amplitude']:.2f}, phase={task['phase']:.2f}", fontsize=10)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    ax = fig.add_subplot(grid[:, 2])
    iterations, losses = list(history.get("iterations", [])), list(history.get("meta_loss", []))
    if iterations:
        ax.plot(iterations, losses, color="tab:gray", alpha=0.3, lw=0.8,
                label=f"meta-loss: query MSE after {train_steps} inner step{'s' * (train_steps != 1)}")
        window = max(1, len(losses) // 50)
        ax.plot(iterations, _smooth(losses, window), color="tab:gray", lw=1.5,
                label=f"meta-loss, moving mean of {window}")
    if history.get("eval_iterations"):
        steps = tasks[0]["steps"] if tasks else "the evaluation"
        ax.plot(history["eval_iterations"], history["eval_loss"], "o-", color="tab:red", ms=4,
                label=f"held-out MSE after {steps} inner steps")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("mean squared error")
    ax.set_title("meta-training", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_accuracy(path: str | os.PathLike, curves: Mapping[str, Mapping[str, Sequence[float]]], *,
                  chance: float | None = None, title: str = "") -> None:
    """Draw validation accuracy over training for several methods, against iterations and wall time.

    Args:
        path: Where the PNG goes.
        curves: ``label -> {"iterations": [...], "accuracy": [...], "time": [...]}``
            (``time``: training seconds at each evaluation; optional).
        chance: Accuracy of guessing (a dotted line), e.g. ``1 / ways``.
        title: Figure title.

    Raises:
        ImportError: If matplotlib is missing (the message names the ``plot`` extra).
    """
    fig = _figure(figsize=(12, 4.8), layout="constrained")
    by_iteration, by_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, curve in curves.items():
        accuracy = [float("nan") if a is None else a for a in curve["accuracy"]]
        line = by_iteration.plot(curve["iterations"], accuracy, "o-", ms=3, label=label)[0]
        if curve.get("time"):
            by_time.plot(curve["time"], accuracy, "o-", ms=3, color=line.get_color(), label=label)
    for ax, xlabel in ((by_iteration, "training iteration"), (by_time, "training time (s)")):
        if chance is not None:
            ax.axhline(chance, color="black", ls=":", lw=1, label="chance")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy after adaptation")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    _save(fig, path)
