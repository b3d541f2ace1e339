"""Multi-process meta-training over a real torch.distributed (gloo) process group."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from metann.data import SinusoidTaskSampler
from metann.meta import MAML, MetaSGD, default_evaluator_regression
from metann.train import MetaTrainer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SCENARIOS = {"maml-1-step": ("maml", 1, 4), "maml-3-steps": ("maml", 3, 4), "metasgd-3-steps": ("metasgd", 3, 4),
             "uneven-batch": ("maml", 3, 5), "fewer-tasks-than-ranks": ("maml", 2, 1)}

WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[5])
    from metann.data import SinusoidTaskSampler
    from tests.test_distributed import SCENARIOS, make_trainer
    torch.set_num_threads(1)
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    try:
        for name, (algo, steps, batch) in SCENARIOS.items():
            trainer = make_trainer(algo, seed_model=rank)  # different start on purpose: rank 0's is broadcast
            history = trainer.fit(steps, batch)
            evaluation = trainer.evaluate(SinusoidTaskSampler(seed=77, dtype=torch.float64).sample(5))
            results[name] = {"params": [p.detach() for p in trainer.maml.parameters()],
                             "loss": history.meta_loss, "eval": evaluation}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()
    """
)


def make_trainer(algo, seed_model=0):
    torch.manual_seed(seed_model)
    net = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)).double()
    cls = {"maml": MAML, "metasgd": MetaSGD}[algo]
    maml = cls(net, steps_train=2, lr=0.05, evaluator=default_evaluator_regression)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    sampler = SinusoidTaskSampler(seed=3, dtype=torch.float64)
    return MetaTrainer(maml, optimizer, sampler, progress=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every scenario once on two gloo ranks (one pair of processes for the whole module)."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = str(free_port())
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", port, str(out), root],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in range(2)
    ]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:  # clean shutdown even when a rank hangs or fails
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_equal_one_process(two_ranks, scenario):
    algo, steps, batch = SCENARIOS[scenario]
    distributed = two_ranks[scenario]
    single = make_trainer(algo)
    history = single.fit(steps, batch)
    evaluation = single.evaluate(SinusoidTaskSampler(seed=77, dtype=torch.float64).sample(5))
    assert len(distributed["params"]) == len(list(single.maml.parameters()))
    for got, expected in zip(distributed["params"], single.maml.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(distributed["loss"]), torch.tensor(history.meta_loss))
    assert distributed["eval"] == pytest.approx(evaluation, rel=1e-10)
