"""MetaTrainer: meta-steps, evaluation, fitting, checkpoints and resuming."""
import copy
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from metann.data import FewShotSampler, SinusoidTaskSampler, Task
from metann.meta import MAML, MetaSGD, default_evaluator_regression
from metann.train import CHECKPOINT_NAME, CheckpointError, History, MetaTrainer, strict_json


def sine_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def make_trainer(algo=MAML, seed=0, **kwargs):
    maml = algo(sine_net(), steps_train=1, steps_eval=3, lr=0.01, evaluator=default_evaluator_regression)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    return MetaTrainer(maml, optimizer, SinusoidTaskSampler(seed=seed), progress=False, **kwargs)


def test_meta_step_uses_the_mean_query_loss():
    trainer = make_trainer()
    tasks = SinusoidTaskSampler(seed=5).sample(3)
    shadow = copy.deepcopy(trainer.maml)
    losses = [default_evaluator_regression(shadow(t.support), t.query) for t in tasks]
    expected_loss = torch.stack(losses).mean()
    expected_grads = torch.autograd.grad(expected_loss, list(shadow.parameters()))
    trainer.maml.model[0].weight.grad = torch.full_like(trainer.maml.model[0].weight, 7.0)  # stale gradient
    optimizer = trainer.meta_optimizer
    captured = {}
    original_step = optimizer.step

    def spy_step(*args, **kwargs):
        captured["grads"] = [p.grad.clone() for p in trainer.maml.parameters()]
        return original_step(*args, **kwargs)

    optimizer.step = spy_step
    loss = trainer.meta_step(tasks)
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    for got, e in zip(captured["grads"], expected_grads):
        torch.testing.assert_close(got, e)
    assert not any(torch.equal(p, q) for p, q in zip(trainer.maml.parameters(), shadow.parameters()))


def test_evaluate_changes_nothing_and_reports_accuracy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    maml = MAML(net, steps_train=1, steps_eval=2, lr=0.1)
    trainer = MetaTrainer(maml, torch.optim.SGD(maml.parameters(), lr=0.1), _ClassSampler(), progress=False)
    for p in maml.parameters():
        p.grad = torch.ones_like(p)
    net[1].train()
    net[3].eval()
    modes = [m.training for m in maml.modules()]
    state = copy.deepcopy(maml.state_dict())
    loss = trainer.evaluate(_ClassSampler().sample(4))
    assert loss > 0 and 0.0 <= trainer.last_accuracy <= 1.0
    assert [m.training for m in maml.modules()] == modes
    for key, value in maml.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in maml.parameters())


class _ClassSampler:
    """Three-way tasks from a fixed Gaussian mixture (labels 0..2)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.means = torch.randn(3, 4, generator=g) * 3
        self.g = g

    def sample(self, n):
        tasks = []
        for _ in range(n):
            y = torch.arange(3).repeat(4)
            x = self.means[y] + torch.randn(12, 4, generator=self.g)
            tasks.append(Task(x[:6], y[:6], x[6:], y[6:]))
        return tasks


def test_fit_learns_to_adapt_on_sinusoids():
    torch.manual_seed(0)
    maml = MAML(sine_net(), steps_train=1, steps_eval=5, lr=0.02, evaluator=default_evaluator_regression)
    trainer = MetaTrainer(maml, torch.optim.Adam(maml.parameters(), lr=3e-3), SinusoidTaskSampler(seed=0),
                          progress=False)
    held_out = SinusoidTaskSampler(seed=1234).sample(100)
    unadapted = MAML(maml.model, steps_train=0, evaluator=default_evaluator_regression)
    before = MetaTrainer(unadapted, torch.optim.SGD(maml.parameters(), lr=0.0), SinusoidTaskSampler(),
                         progress=False)
    history = trainer.fit(400, 10, eval_every=200, eval_tasks=held_out)
    pre = before.evaluate(held_out)
    post = trainer.evaluate(held_out)
    assert history.iterations == list(range(1, 401))
    assert history.eval_iterations == [200, 400]
    assert post < 0.5 * pre, (pre, post)


def test_fit_argument_errors():
    trainer = make_trainer()
    with pytest.raises(ValueError, match=re.escape("`meta_batch_size` must be >= 1, got 0")):
        trainer.fit(1, 0)
    with pytest.raises(ValueError, match=re.escape("`num_iterations` must be >= 0, got -1")):
        trainer.fit(-1, 2)
    with pytest.raises(ValueError, match=re.escape("`eval_every` needs `eval_tasks`")):
        trainer.fit(1, 2, eval_every=1)
    with pytest.raises(ValueError, match=re.escape("`checkpoint_every` needs a `checkpoint_dir`")):
        trainer.fit(1, 2, checkpoint_every=1)
    with pytest.raises(ValueError, match=re.escape("`tasks` is empty")):
        trainer.meta_step([])
    with pytest.raises(TypeError, match=re.escape("`meta_optimizer` must be a `torch.optim.Optimizer`")):
        MetaTrainer(trainer.maml, None, SinusoidTaskSampler())
    assert trainer.iteration == 0


@pytest.mark.parametrize("algo", [MAML, MetaSGD])
def test_resume_after_an_exception_matches_an_uninterrupted_run(tmp_path, algo):
    straight = make_trainer(algo)
    straight.fit(8, 3)

    class Stop(Exception):
        pass

    def stop_at_5(trainer, iteration, loss):
        if iteration == 5:
            raise Stop

    interrupted = make_trainer(algo)
    with pytest.raises(Stop):
        interrupted.fit(8, 3, callback=stop_at_5, checkpoint_dir=tmp_path, checkpoint_every=2)
    torch.manual_seed(999)  # the checkpoint restores the global RNG too
    resumed = make_trainer(algo, seed=42)  # the sampler state comes from the checkpoint
    history = resumed.fit(8, 3, checkpoint_dir=tmp_path, resume=True)
    assert history.iterations == list(range(1, 9))
    assert history.meta_loss == straight.history.meta_loss
    for (name, a), b in zip(resumed.maml.named_parameters(), straight.maml.parameters()):
        assert torch.equal(a, b), name
    first = [next(iter(t.maml.parameters())) for t in (straight, resumed)]
    assert torch.equal(
        straight.meta_optimizer.state[first[0]]["exp_avg"], resumed.meta_optimizer.state[first[1]]["exp_avg"]
    )


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from metann.data import SinusoidTaskSampler
    from metann.meta import MAML, default_evaluator_regression
    from metann.train import MetaTrainer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    maml = MAML(net, steps_train=1, lr=0.01, evaluator=default_evaluator_regression)
    trainer = MetaTrainer(maml, torch.optim.Adam(maml.parameters(), 1e-3), SinusoidTaskSampler(seed=0),
                          progress=False)
    def slow(trainer, iteration, loss):
        if iteration == 3:
            print("ready", flush=True)
        if sys.argv[2] == "slow":
            time.sleep(0.05)
    history = trainer.fit(int(sys.argv[3]), 4, callback=slow, checkpoint_dir=sys.argv[1], resume=True)
    print("interrupted" if history.interrupted else "finished", trainer.iteration, flush=True)
    """
)


def test_sigterm_writes_a_checkpoint_and_resume_matches(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SIGTERM_SCRIPT)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    run_dir, straight_dir = tmp_path / "run", tmp_path / "straight"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), "slow", "400"], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    word, stopped_at = out.split()
    assert word == "interrupted" and 3 <= int(stopped_at) < 400
    target = str(int(stopped_at) + 3)
    resumed = subprocess.run([sys.executable, str(script), str(run_dir), "fast", target], capture_output=True,
                             text=True, env=env, timeout=120)
    assert resumed.stdout.split() == ["finished", target], resumed.stderr
    straight = subprocess.run([sys.executable, str(script), str(straight_dir), "fast", target],
                              capture_output=True, text=True, env=env, timeout=120)
    assert straight.returncode == 0, straight.stderr
    a = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(straight_dir / CHECKPOINT_NAME, weights_only=True)
    assert a["iteration"] == b["iteration"] == int(target)
    for key in b["maml"]:
        assert torch.equal(a["maml"][key], b["maml"][key]), key


def test_checkpoint_contents_and_refusals(tmp_path):
    trainer = make_trainer(metrics_path=tmp_path / "metrics.jsonl")
    trainer.fit(2, 2, checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    assert payload["iteration"] == 2 and set(payload["rng"]) >= {"torch", "sampler"}
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    before = [p.detach().clone() for p in trainer.maml.parameters()]

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or holds objects"):
        trainer.load_checkpoint(truncated)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(pickle.dumps({"format": "metann-checkpoint", "evil": Evil()}))
    with pytest.raises(CheckpointError, match="truncated, corrupt or holds objects"):
        trainer.load_checkpoint(foreign)

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="is not a metann checkpoint"):
        trainer.load_checkpoint(other)

    wrong = dict(payload, maml={**payload["maml"], "model.0.weight": torch.zeros(2, 2)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=re.escape("'model.0.weight' has shape (2, 2), the model expects (40, 1)")):
        trainer.load_checkpoint(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        trainer.load_checkpoint(tmp_path / "missing.pt")
    assert trainer.iteration == 2
    assert all(torch.equal(p, b) for p, b in zip(trainer.maml.parameters(), before))

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == [1, 2]


def test_strict_json_and_history_round_trip():
    assert strict_json({"a": float("nan"), "b": float("inf"), "c": 1.5}) == '{"a": null, "b": null, "c": 1.5}'
    history = History(iterations=[1], meta_loss=[0.5], wall_time=[0.1], eval_accuracy=[None])
    assert History.from_dict(history.to_dict()) == history


def test_fewshot_sampler_trains_with_accuracy():
    torch.manual_seed(0)
    inputs = torch.randn(60, 5)
    labels = torch.arange(6).repeat_interleave(10)
    inputs = inputs + labels.unsqueeze(1).float()
    sampler = FewShotSampler(inputs, labels, ways=3, shots=2, queries=3, seed=0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    maml = MAML(net, steps_train=1, steps_eval=2, lr=0.1)
    trainer = MetaTrainer(maml, torch.optim.Adam(maml.parameters(), 1e-2), sampler, progress=False)
    history = trainer.fit(4, 2, eval_every=2, eval_tasks=FewShotSampler(inputs, labels, 3, 2, 3, seed=1).sample(5))
    assert history.eval_iterations == [2, 4]
    assert all(0.0 <= a <= 1.0 for a in history.eval_accuracy)


def test_plain_progress_goes_to_stderr(capsys):
    trainer = make_trainer()
    trainer.progress = True
    trainer.log_every = 2
    trainer.fit(4, 2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.findall(r"iteration (\d+)/4", captured.err) == ["2", "4"]


def test_sigint_between_steps_stops_cleanly(tmp_path):
    trainer = make_trainer()

    def interrupt(trainer, iteration, loss):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)

    history = trainer.fit(10, 2, callback=interrupt, checkpoint_dir=tmp_path)
    assert history.interrupted and trainer.iteration == 2
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["iteration"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fit_advances_the_maml_plus_plus_schedule():
    maml = MAML(sine_net(), steps_train=2, lr=0.01, evaluator=default_evaluator_regression, multi_step_loss=10)
    trainer = MetaTrainer(maml, torch.optim.Adam(maml.parameters(), 1e-3), SinusoidTaskSampler(seed=0),
                          progress=False)
    first = maml.loss_weights()
    trainer.fit(3, 2)
    assert maml.meta_iteration == 3
    assert maml.loss_weights() != first
