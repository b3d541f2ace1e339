"""The meta-training loop: MetaTrainer, History, safe checkpoints and multi-process training."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "History", "MetaTrainer", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "metann-checkpoint"
_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, foreign or does not fit the trainer."""


@dataclass
class History:
    """What :meth:`MetaTrainer.fit` measured.

    Attributes:
        iterations: Iteration number (1-based) of each meta-step.
        meta_loss: Mean query loss of each meta-step.
        wall_time: Seconds since the start of training (summed over resumed runs).
        eval_iterations: Iterations at which an evaluation ran.
        eval_loss: Mean query loss after adaptation, per evaluation.
        eval_accuracy: Query accuracy per evaluation (classification), else ``None``.
        interrupted: Whether the last ``fit`` stopped early on SIGINT/SIGTERM.
    """

    iterations: list[int] = field(default_factory=list)
    meta_loss: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    eval_iterations: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float | None] = field(default_factory=list)
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, loadable with ``torch.load(weights_only=True)`` and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Rebuild a history saved by :meth:`to_dict`."""
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in data.items()})


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_json(record: dict[str, Any]) -> str:
    """One line of strict JSON: NaN and infinities become ``null``."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` with ``torch.save`` atomically: temporary file, fsync, ``os.replace``.

    A reader sees either the previous complete file or the new complete file, never a
    half-written one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """Read a metann checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointError: If the file is truncated, not a torch file, holds arbitrary
            pickled objects, or is not a metann checkpoint.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: it is truncated, corrupt or holds objects other than tensors "
            f"and plain containers ({type(err).__name__}: {first})."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path!r} is not a metann checkpoint (no {_FORMAT!r} marker).")
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {payload.get('version')!r}, expected {_VERSION}.")
    return payload


def _check_state_dict(module: nn.Module, state: Any, path: str) -> None:
    """Refuse a state dict whose keys or shapes do not fit ``module``, before anything is loaded."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds no model state.")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model: missing {missing}, unexpected {unexpected}."
        )
    for key, value in own.items():
        if not isinstance(state[key], Tensor) or state[key].shape != value.shape:
            got = tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__
            raise CheckpointError(
                f"checkpoint {path!r}: {key!r} has shape {got}, the model expects {tuple(value.shape)}."
            )


class _Progress:
    """tqdm on a terminal, else a plain line on stderr every ``every`` iterations; stdout stays clean."""

    def __init__(self, total: int, start: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.bar = None
        self.started = time.perf_counter()
        self.start = start
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, file=sys.stderr, unit="it", dynamic_ncols=True)

    def update(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif iteration % self.every == 0 or iteration == self.total:
            rate = (iteration - self.start) / max(time.perf_counter() - self.started, 1e-9)
            print(f"iteration {iteration}/{self.total}  meta-loss {loss:.4f}  ({rate:.2f} it/s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _stop_on_signals(flag: dict[str, bool]) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into a request to stop after the current step (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_positive_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got `{type(value).__name__}`.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


class MetaTrainer:
    """Meta-train a :class:`~metann.meta.MAML`-style wrapper on tasks from a sampler.

    Args:
        maml: The algorithm (``MAML``, ``MetaSGD``, ``ANIL``, ...): ``maml(support)``
            returns an adapted model and ``maml.evaluator(fast, query)`` its loss.
        meta_optimizer: A ``torch.optim`` optimizer over ``maml.parameters()``.
        task_sampler: Anything with ``sample(n) -> list[Task]``; with ``get_state`` /
            ``set_state`` its stream is saved in checkpoints.
        device: Where tasks are moved before use (default: the device of the first
            meta-parameter).
        metrics_path: Optional JSON-lines file; one strict-JSON record per iteration
            (NaN and infinities as ``null``) and one per evaluation.
        log_every: Iterations between plain progress lines when stderr is not a terminal.
        progress: Show progress on stderr (a tqdm bar on a terminal).
        distributed: Average meta-gradients over an initialised ``torch.distributed``
            process group. ``None`` (default): whenever one is initialised.
        vectorize: Run each meta-batch through ``maml.batched`` (one ``torch.func.vmap``
            over tasks) instead of a loop over tasks: much faster for many tasks on a
            small model; tasks must share their shapes (see :meth:`metann.meta.MAML.batched`).

    Multi-process training: every rank must hold the same model and a sampler seeded
    identically; each rank draws the whole meta-batch and keeps its own contiguous
    share (``meta_batch_size`` need not divide by the world size: the first ranks take
    one task more). Each rank back-propagates its tasks' losses divided by the global
    number of tasks, and one flattened ``all_reduce`` sums the meta-gradients, so the
    update equals the single-process update over the whole meta-batch. Only rank 0
    writes checkpoints and metrics and shows progress.

    Example:
        >>> from metann.data import SinusoidTaskSampler
        >>> from metann.meta import MAML, default_evaluator_regression
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        >>> maml = MAML(net, lr=0.01, evaluator=default_evaluator_regression)
        >>> trainer = MetaTrainer(maml, torch.optim.Adam(maml.parameters(), 1e-3), SinusoidTaskSampler(seed=0),
        ...                       progress=False)
        >>> history = trainer.fit(3, meta_batch_size=4)
        >>> history.iterations
        [1, 2, 3]
    """

    def __init__(
        self,
        maml: nn.Module,
        meta_optimizer: torch.optim.Optimizer,
        task_sampler: Any,
        *,
        device: torch.device | str | None = None,
        metrics_path: str | os.PathLike | None = None,
        log_every: int = 50,
        progress: bool = True,
        distributed: bool | None = None,
        vectorize: bool = False,
    ) -> None:
        if not isinstance(maml, nn.Module) or not callable(getattr(maml, "evaluator", None)):
            raise TypeError(
                "`maml` must be a metann.meta algorithm (an `nn.Module` with an `evaluator`), "
                f"got `{type(maml).__name__}`."
            )
        if not isinstance(meta_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`meta_optimizer` must be a `torch.optim.Optimizer`, got `{type(meta_optimizer).__name__}`."
            )
        if not callable(getattr(task_sampler, "sample", None)):
            raise TypeError(f"`task_sampler` must have a `sample(n)` method, got `{type(task_sampler).__name__}`.")
        self.maml = maml
        self.meta_optimizer = meta_optimizer
        self.task_sampler = task_sampler
        first = next(iter(maml.parameters()), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else None)
        self.metrics_path = os.fspath(metrics_path) if metrics_path is not None else None
        self.log_every = _check_positive_int(log_every, "log_every", 1)
        self.progress = progress
        self.vectorize = bool(vectorize)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("`distributed=True` needs an initialised `torch.distributed` process group.")
        self.distributed = bool(distributed)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.history = History()
        self.iteration = 0
        self.last_accuracy: float | None = None
        self._elapsed = 0.0
        if self.distributed:
            self._broadcast_state()

    # ---------------------------------------------------------------- distributed helpers
    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0, or a single process)."""
        return self.rank == 0

    def _broadcast_state(self) -> None:
        """Start every rank from rank 0's parameters and buffers."""
        with torch.no_grad():
            for tensor in list(self.maml.parameters()) + list(self.maml.buffers()):
                dist.broadcast(tensor, src=0)

    def _share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (the first ranks take one more when uneven)."""
        n, world, rank = len(items), self.world_size, self.rank
        base, extra = divmod(n, world)
        start = rank * base + min(rank, extra)
        return list(items[start : start + base + (rank < extra)])

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def _reduce_device(self) -> torch.device:
        backend = dist.get_backend() if self.distributed else "gloo"
        return self.device if backend == "nccl" and self.device is not None else torch.device("cpu")

    def _all_reduce_grads(self) -> None:
        """Sum every meta-parameter's gradient over the ranks with one flattened ``all_reduce``."""
        params = [p for p in self.maml.parameters() if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    # ---------------------------------------------------------------- steps
    def _prepare(self, tasks: Sequence[Any], name: str) -> list[Any]:
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
            raise TypeError(f"`{name}` must be a list of tasks, got `{type(tasks).__name__}`.")
        if len(tasks) == 0:
            raise ValueError(f"`{name}` is empty; give at least one task.")
        if self.device is None:
            return list(tasks)
        return [t.to(self.device) if hasattr(t, "to") else t for t in tasks]

    def meta_step(self, tasks: Sequence[Any]) -> float:
        """One meta-update on ``tasks``: adapt to each support set, back-propagate the mean query loss, step.

        Stale gradients are cleared first.

        Each task's loss comes from ``maml.meta_objective(task)`` when the algorithm
        defines it (MAML and its relatives do), else from ``maml.evaluator(maml(support), query)``.

        In a distributed run ``tasks`` is this rank's share and the mean runs over the
        tasks of all ranks.

        Returns:
            The mean query loss over the (global) meta-batch.
        """
        # In a distributed run a rank's share may be empty (fewer tasks than ranks): it
        # still joins the collectives with zero gradients.
        tasks = [] if self.distributed and len(tasks) == 0 else self._prepare(tasks, "tasks")
        self.maml.train()
        self.meta_optimizer.zero_grad(set_to_none=True)
        count = self._all_reduce_sum([float(len(tasks))])[0]
        if self.vectorize and tasks:
            losses = self.maml.batched(tasks)
            (losses.sum() / count).backward()
            total = losses.detach().sum().item()
        else:
            total = 0.0  # stays 0 for an empty share
            objective = getattr(self.maml, "meta_objective", None) or self._default_objective
            for task in tasks:
                loss, reported = objective(task)
                (loss / count).backward()  # one task's graph at a time keeps the peak memory low
                total += float(reported.detach()) if isinstance(reported, Tensor) else float(reported)
        if self.distributed:
            self._all_reduce_grads()
        self.meta_optimizer.step()
        schedule = getattr(self.maml, "step_schedule", None)  # MAML++ annealing counts meta-iterations
        if schedule is not None:
            schedule()
        return self._all_reduce_sum([total])[0] / count

    def _default_objective(self, task: Any) -> tuple[Tensor, Tensor]:
        loss = self.maml.evaluator(self.maml(task.support), task.query)
        return loss, loss

    def evaluate(self, tasks: Sequence[Any]) -> float:
        """Mean query loss after adaptation (eval mode: ``steps_eval`` first-order steps).

        Changes no parameter, gradient, buffer or train/eval mode. For classification
        (integer query labels) the query accuracy is kept in :attr:`last_accuracy`.
        In a distributed run each rank evaluates its share and the results are summed.
        """
        tasks = self._share(self._prepare(tasks, "tasks")) if self.distributed else self._prepare(tasks, "tasks")
        modes = [m.training for m in self.maml.modules()]
        self.maml.eval()
        loss_sum, correct, counted = 0.0, 0.0, 0.0
        try:
            for task in tasks:
                fast = self.maml(task.support)
                with torch.no_grad():
                    loss_sum += self.maml.evaluator(fast, task.query).item()
                    x, y = task.query
                    if not y.is_floating_point():
                        correct += (fast(x).argmax(-1) == y).sum().item()
                        counted += y.numel()
        finally:
            for m, mode in zip(self.maml.modules(), modes):
                m.training = mode
        n_tasks, loss_sum, correct, counted = self._all_reduce_sum([float(len(tasks)), loss_sum, correct, counted])
        self.last_accuracy = correct / counted if counted else None
        return loss_sum / n_tasks

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, iteration, history and random states."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if hasattr(self.task_sampler, "get_state"):
            rng["sampler"] = self.task_sampler.get_state()
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "iteration": self.iteration,
            "elapsed": self._elapsed,
            "maml": self.maml.state_dict(),
            "optimizer": self.meta_optimizer.state_dict(),
            "history": self.history.to_dict(),
            "rng": rng,
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically to ``path`` (rank 0 only in distributed runs)."""
        if self.is_main:
            save_checkpoint(path, self.state_dict())
        if self.distributed:
            dist.barrier()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`; nothing changes if it is refused.

        Raises:
            FileNotFoundError: If there is no such file.
            CheckpointError: If the file is unreadable, foreign, or does not fit this trainer.
        """
        path = os.fspath(path)
        payload = load_checkpoint(path, map_location=self.device)
        _check_state_dict(self.maml, payload.get("maml"), path)
        history = payload.get("history")
        if not isinstance(history, dict) or not isinstance(payload.get("iteration"), int):
            raise CheckpointError(f"checkpoint {path!r} has no iteration or history.")
        try:
            history = History.from_dict(history)
        except TypeError as err:
            raise CheckpointError(f"checkpoint {path!r} has a malformed history: {err}") from err
        optimizer_state = self.meta_optimizer.state_dict()
        try:
            self.meta_optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, ValueError, TypeError) as err:
            self.meta_optimizer.load_state_dict(optimizer_state)
            raise CheckpointError(f"checkpoint {path!r} does not fit the meta-optimizer: {err}") from err
        self.maml.load_state_dict(payload["maml"])
        rng = payload.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "sampler" in rng and hasattr(self.task_sampler, "set_state"):
            self.task_sampler.set_state(rng["sampler"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.iteration = payload["iteration"]
        self._elapsed = float(payload.get("elapsed", 0.0))
        self.history = history

    # ---------------------------------------------------------------- the loop
    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics_path is not None and self.is_main:
            folder = os.path.dirname(os.path.abspath(self.metrics_path))
            os.makedirs(folder, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(strict_json(record) + "\n")

    def fit(
        self,
        num_iterations: int,
        meta_batch_size: int,
        *,
        eval_every: int | None = None,
        eval_tasks: Sequence[Any] | None = None,
        callback: Callable[[MetaTrainer, int, float], Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ) -> History:
        """Meta-train until ``num_iterations`` meta-steps have been taken in total.

        Args:
            num_iterations: Total meta-steps (a resumed run continues up to this number).
            meta_batch_size: Tasks per meta-step (over all ranks in a distributed run).
            eval_every: Evaluate on ``eval_tasks`` every this many iterations (and at the end).
            eval_tasks: Fixed held-out tasks for evaluation.
            callback: ``callback(trainer, iteration, meta_loss)`` after each step; an
                exception raised there stops training (after a checkpoint was written
                for every completed ``checkpoint_every`` interval).
            checkpoint_dir: Folder for ``checkpoint.pt``, written atomically every
                ``checkpoint_every`` iterations, at the end and when stopped by a signal.
            checkpoint_every: Iterations between checkpoints (default: only at the end).
            resume: Continue from ``checkpoint_dir/checkpoint.pt`` when it exists.

        Returns:
            The :class:`History`, also kept in :attr:`history`.

        SIGINT and SIGTERM finish the current step, write a checkpoint and return with
        ``history.interrupted = True``.
        """
        num_iterations = _check_positive_int(num_iterations, "num_iterations", 0)
        meta_batch_size = _check_positive_int(meta_batch_size, "meta_batch_size", 1)
        if eval_every is not None:
            _check_positive_int(eval_every, "eval_every", 1)
            if eval_tasks is None:
                raise ValueError("`eval_every` needs `eval_tasks` to evaluate on.")
        if checkpoint_every is not None:
            _check_positive_int(checkpoint_every, "checkpoint_every", 1)
            if checkpoint_dir is None:
                raise ValueError("`checkpoint_every` needs a `checkpoint_dir`.")
        if eval_tasks is not None:
            eval_tasks = self._prepare(eval_tasks, "eval_tasks")
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME) if checkpoint_dir is not None else None
        if resume and path is not None and os.path.exists(path):
            self.load_checkpoint(path)
        self.history.interrupted = False
        flag = {"stop": False}
        progress = _Progress(num_iterations, self.iteration, self.log_every, self.progress and self.is_main)
        started = time.perf_counter() - self._elapsed
        try:
            with _stop_on_signals(flag):
                while self.iteration < num_iterations and not self._stop_requested(flag):
                    self._one_iteration(meta_batch_size, started, progress, eval_every, eval_tasks, callback)
                    if path is not None and checkpoint_every and self.iteration % checkpoint_every == 0:
                        self.save_checkpoint(path)
                self.history.interrupted = self.iteration < num_iterations
                if eval_every is not None and self.iteration not in self.history.eval_iterations:
                    self._evaluate_and_log(eval_tasks)
                if path is not None:
                    self.save_checkpoint(path)
        finally:
            progress.close()
        return self.history

    def _stop_requested(self, flag: dict[str, bool]) -> bool:
        if not self.distributed:
            return flag["stop"]
        return self._all_reduce_sum([float(flag["stop"])])[0] > 0  # every rank stops together

    def _one_iteration(self, batch: int, started: float, progress: _Progress, eval_every: int | None,
                       eval_tasks: Sequence[Any] | None, callback: Callable | None) -> None:
        tasks = self.task_sampler.sample(batch)
        loss = self.meta_step(self._share(tasks) if self.distributed else tasks)
        self.iteration += 1
        self._elapsed = time.perf_counter() - started
        self.history.iterations.append(self.iteration)
        self.history.meta_loss.append(loss)
        self.history.wall_time.append(self._elapsed)
        self._log({"iteration": self.iteration, "meta_loss": loss, "time": self._elapsed})
        progress.update(self.iteration, loss)
        if eval_every is not None and self.iteration % eval_every == 0:
            self._evaluate_and_log(eval_tasks)
        if callback is not None:
            callback(self, self.iteration, loss)

    def _evaluate_and_log(self, eval_tasks: Sequence[Any]) -> None:
        loss = self.evaluate(eval_tasks)
        self.history.eval_iterations.append(self.iteration)
        self.history.eval_loss.append(loss)
        self.history.eval_accuracy.append(self.last_accuracy)
        self._log({"iteration": self.iteration, "eval_loss": loss, "eval_accuracy": self.last_accuracy})
