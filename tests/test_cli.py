"""The `metann` command, run as a real subprocess with tiny budgets (and argparse checks in-process)."""
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import metann
from metann.cli import main

TIMEOUT = 180
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TINY = ["--iterations", "3", "--meta-batch", "2", "--eval-tasks", "6", "--eval-steps", "2"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run(*args, prefix=(sys.executable, "-m", "metann"), timeout=TIMEOUT):
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def _reject(token):
    raise ValueError(f"not strict JSON: {token}")


def read_metrics(path):
    """Every line parsed as strict JSON (NaN or Infinity would raise)."""
    with open(path) as f:
        return [json.loads(line, parse_constant=_reject) for line in f]


def load_state(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metann: error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def assert_interval(stats, n):
    assert stats["n"] == n and math.isfinite(stats["mean"]) and stats["std"] >= 0
    low, high = stats["ci95"]
    assert low <= stats["mean"] <= high
    assert math.isclose(high - stats["mean"], 1.96 * stats["std"] / math.sqrt(n), rel_tol=1e-9)


def test_sine_writes_every_promised_file(tmp_path):
    out = tmp_path / "run"
    result = run("sine", *TINY, "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected = {"metrics.jsonl", "summary.json", "checkpoint.pt", "settings.json"} | ({"sine.png"} if HAS_MATPLOTLIB else set())
    assert set(os.listdir(out)) == expected

    summary = json.loads((out / "summary.json").read_text(), parse_constant=_reject)
    assert summary["command"] == "sine" and summary["iterations"] == 3
    assert summary["device"] == "cpu" and summary["world_size"] == 1
    assert summary["torch_version"] == torch.__version__ and summary["metann_version"] == metann.__version__
    assert summary["wall_time_seconds"] > summary["training_time_seconds"] > 0
    assert summary["settings"]["algo"] == "maml" and summary["settings"]["seed"] == 3
    assert summary["held_out"] == {"tasks": 6, "shots": 10, "query_points": 100, "inner_steps": 2,
                                   "seed": 3 + 1_000_003}
    for key in ("pre_adaptation_mse", "post_adaptation_mse"):
        assert_interval(summary[key], 6)
        assert 0 < summary[key]["mean"] < 50
    assert sorted(summary["files"]) == sorted(expected)

    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "meta_loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3] and all(r["meta_loss"] > 0 for r in steps)
    assert [r["iteration"] for r in records if "eval_loss" in r] == [1, 2, 3]

    state = load_state(out)
    assert state["iteration"] == 3 and state["history"]["meta_loss"] == [r["meta_loss"] for r in steps]
    assert f"{summary['post_adaptation_mse']['mean']:.3f}" in result.stdout and str(out) in result.stdout
    assert "iteration 3/3" in result.stderr and "iteration 3/3" not in result.stdout  # progress stays on stderr
    if HAS_MATPLOTLIB:
        png = (out / "sine.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # four task panels and a training curve


def test_without_matplotlib_everything_but_the_figure_is_written(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from metann.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    result = run("sine", *TINY, "--out", str(tmp_path), prefix=(sys.executable, "-c", code))
    assert result.returncode == 0, result.stderr
    assert "pip install 'metann[plot]'" in result.stderr and "Traceback" not in result.stderr
    assert set(os.listdir(tmp_path)) == {"metrics.jsonl", "summary.json", "checkpoint.pt", "settings.json"}
    assert "sine.png" not in json.loads((tmp_path / "summary.json").read_text())["files"]


def test_help_of_every_command(capsys):
    result = run("sine", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: metann sine") and "--inner-lr" in result.stdout
    for args, expected in ((["--help"], "meta-train an MLP on sinusoid regression"), (["fewshot", "--help"], "--ways")):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 0 and expected in capsys.readouterr().out


def test_version_and_console_script():
    script = shutil.which("metann")
    if script is None:
        pytest.skip("the `metann` console script is not on PATH (package not installed)")
    result = run("--version", prefix=(script,))
    assert result.returncode == 0 and result.stdout.strip().startswith(f"metann {metann.__version__}")


@pytest.mark.parametrize("args, fragment", [
    (["sine", "--shots", "0"], "--shots: must be an integer >= 1, got 0"),
    (["fewshot", "--eval-tasks", "0"], "--eval-tasks: must be an integer >= 1, got 0"),
])
def test_bad_arguments_exit_2_with_one_line(args, fragment):
    assert_one_error_line(run(*args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["sine", "--meta-batch", "0"], "--meta-batch: must be an integer >= 1, got 0"),
    (["sine", "--algo", "reptile"], "--algo: invalid choice: 'reptile'"),
    (["sine", "--inner-lr", "-0.1"], "--inner-lr: must be a finite number > 0"),
    (["sine", "--meta-lr", "nan"], "--meta-lr: must be a finite number > 0"),
    (["sine", "--iterations", "ten"], "--iterations: expected an integer, got 'ten'"),
    (["sine", "--threads", "0"], "--threads: must be an integer >= 1"),
    (["sine", "--device", "gpu7"], "--device: not a torch device"),
    (["fewshot", "--ways", "1"], "--ways: must be an integer >= 2"),
    (["fewshot", "--image-size", "8"], "--image-size: must be an integer >= 16"),
    (["fewshot", "--dataset", "omniglot"], "needs --root DIR"),
    (["sine", "--unknown-option"], "unrecognized arguments: --unknown-option"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_values_are_refused_before_any_work(args, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        status = main([*args, "--out", str(tmp_path / "out")] if args else [])
        raise SystemExit(status)
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == ""
    assert captured.err.startswith("metann: error: ") and captured.err.count("\n") == 1
    assert fragment in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys, tmp_path):
    assert main(["sine", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "metann: error: argument --device: CUDA is not available on this machine; use --device cpu\n"


def test_missing_omniglot_root_exits_2(tmp_path):
    missing = tmp_path / "nope"
    result = run("fewshot", "--dataset", "omniglot", "--root", str(missing), "--out", str(tmp_path / "out"))
    assert_one_error_line(result, "--root", str(missing))
    assert not (tmp_path / "out").exists()


def test_resume_ends_like_an_uninterrupted_run(tmp_path, capsys):
    common = ["--meta-batch", "3", "--eval-tasks", "4", "--eval-steps", "2", "--checkpoint-every", "2", "--no-plot"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    started = [subprocess.Popen([sys.executable, "-m", "metann", "sine", *common, "--iterations", str(n), "--out",
                                 str(folder)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for n, folder in ((8, whole), (4, parts))]  # side by side: two cores
    assert [p.wait(timeout=TIMEOUT) for p in started] == [0, 0]
    assert load_state(parts)["iteration"] == 4 and "sine.png" not in os.listdir(parts)  # --no-plot
    resumed = run("sine", *common, "--iterations", "8", "--out", str(parts), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from iteration 4" in resumed.stderr

    a, b = load_state(whole), load_state(parts)
    assert b["iteration"] == 8 and a["maml"].keys() == b["maml"].keys()
    for name in a["maml"]:
        assert torch.equal(a["maml"][name], b["maml"][name]), name
    for key, value in a["optimizer"]["state"][0].items():
        assert torch.equal(value, b["optimizer"]["state"][0][key]), key
    losses = [[r["meta_loss"] for r in read_metrics(folder / "metrics.jsonl") if "meta_loss" in r]
              for folder in (whole, parts)]
    assert len(losses[1]) == 8 and losses[0] == losses[1]  # each iteration logged once, same numbers

    # other settings are refused; without --resume the folder starts afresh
    clash = main(["sine", *common, "--iterations", "8", "--inner-lr", "0.02", "--out", str(parts), "--resume"])
    assert clash == 2 and "--inner-lr 0.01 (now 0.02)" in capsys.readouterr().err
    assert main(["sine", *common, "--iterations", "2", "--out", str(parts)]) == 0  # in-process: no start-up cost
    assert [r["iteration"] for r in read_metrics(parts / "metrics.jsonl") if "meta_loss" in r] == [1, 2]
    assert load_state(parts)["iteration"] == 2


def test_fewshot_on_glyphs_writes_its_files(tmp_path):
    result = run("fewshot", "--iterations", "2", "--meta-batch", "2", "--eval-tasks", "3", "--classes", "30",
                 "--hidden", "8", "--queries", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    expected = {"metrics.jsonl", "summary.json", "checkpoint.pt", "settings.json"} | ({"accuracy.png"} if HAS_MATPLOTLIB else set())
    assert set(os.listdir(tmp_path)) == expected
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_reject)
    assert summary["data"] == {"dataset": "glyphs", "train_classes": 24, "val_classes": 6, "image_size": 16}
    assert summary["chance_accuracy"] == 0.2
    for key in ("pre_adaptation_accuracy", "post_adaptation_accuracy", "baseline_post_adaptation_accuracy"):
        assert_interval(summary[key], 3)
        assert 0 <= summary[key]["mean"] <= 1
    curves = summary["validation_curves"]
    assert set(curves) == {"maml (meta-learned)", "supervised pre-training + fine-tuned head"}
    assert [c["iterations"] for c in curves.values()] == [[1, 2], [1, 2]]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["eval_accuracy"] for r in records if "eval_accuracy" in r] == curves["maml (meta-learned)"]["accuracy"]
    assert load_state(tmp_path)["iteration"] == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_one_set_of_outputs(tmp_path):
    out = tmp_path / "run"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "metann")
    result = run("sine", "--iterations", "3", "--meta-batch", "4", "--eval-tasks", "6", "--eval-steps", "2",
                 "--out", str(out), prefix=launcher)
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == ["run"]
    assert {"metrics.jsonl", "summary.json", "checkpoint.pt", "settings.json"} <= set(os.listdir(out))
    assert result.stdout.count("metann sine:") == 1  # only rank 0 prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["post_adaptation_mse"]["n"] == 6
    state = load_state(out)
    assert state["iteration"] == 3 and len(read_metrics(out / "metrics.jsonl")) == 6
