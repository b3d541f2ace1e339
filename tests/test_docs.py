"""The documentation builds with no warning, its examples run, and it covers every public name."""
from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the doc tools are in the `docs` and `dev` extras: pip install -e '.[dev]'")
pytest.importorskip("sphinx_rtd_theme", reason="the doc tools are in the `docs` and `dev` extras")

import metann

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Every public name of the contract (SPEC.md), under the name the reference documents it by.
SPEC_NAMES = [
    # 1. the engine
    "metann.DependentModule",
    "metann.DependentModule.to_dependentmodule",
    "metann.DependentModule.stateless",
    "metann.DependentModule.register_dependent",
    "metann.DependentModule.named_dependents",
    "metann.DependentModule.dependents",
    "metann.DependentModule.clear_params",
    "metann.DependentModule.substitute",
    "metann.DependentModule.substitute_from_list",
    "metann.DependentModule.update_shapes",
    # 2. stateless calls
    "metann.Learner",
    "metann.Learner.functional",
    # 3. functional core
    "metann.functional.named_params",
    "metann.functional.named_buffers",
    "metann.functional.functional_forward",
    "metann.functional.inner_step",
    "metann.functional.adapt",
    # 4. algorithms
    "metann.meta.MAML",
    "metann.meta.MAML.clone",
    "metann.meta.FastModel",
    "metann.meta.FastModel.adapt",
    "metann.meta.FastModel.adapt_on",
    "metann.meta.MetaSGD",
    "metann.meta.ANIL",
    "metann.meta.default_evaluator_classification",
    "metann.meta.default_evaluator_regression",
    # 5. inner optimizers
    "metann.optim.SGD",
    "metann.optim.RMSprop",
    "metann.optim.Adam",
    # 6. tasks and data
    "metann.data.Task",
    "metann.data.Task.support",
    "metann.data.Task.query",
    "metann.data.TaskSampler",
    "metann.data.TaskSampler.sample",
    "metann.data.SinusoidTaskSampler",
    "metann.data.FewShotSampler",
    "metann.data.Glyphs",
    "metann.data.Omniglot",
    # 7. training
    "metann.train.MetaTrainer",
    "metann.train.MetaTrainer.meta_step",
    "metann.train.MetaTrainer.fit",
    "metann.train.MetaTrainer.evaluate",
    # 8. utilities
    "metann.utils.SubDict",
    "metann.utils.SubDict.update_keys",
    # 10. command line
    "metann.cli.main",
]

# Budgets: the whole site (HTML, then every doctest) must build in well under two minutes.
TIMEOUT = 600


def _sphinx(builder: str, out: Path, *options: str) -> None:
    """Run ``python -m sphinx`` in a subprocess; fail with its whole output on a nonzero exit."""
    command = [sys.executable, "-m", "sphinx", *options, "-b", builder, str(DOCS), str(out)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("METANN_DOCS_INTERSPHINX", None)  # the test build is offline
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        pytest.fail(
            f"`{' '.join(command[1:])}` exited with {done.returncode} after {elapsed:.0f} s\n"
            f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}",
            pytrace=False,
        )
    print(f"sphinx -b {builder}: {elapsed:.1f} s")  # shown by `pytest -s`


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML site, built once for this module with warnings as errors."""
    out = tmp_path_factory.mktemp("docs") / "html"
    _sphinx("html", out, "-W", "--keep-going")
    return out


def _inventory(path: Path) -> dict[str, str]:
    """``{name: domain:role}`` of a Sphinx ``objects.inv`` (version 2: four header lines, then zlib)."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    assert data.startswith(b"# Sphinx inventory version 2"), data[:80]
    entries = {}
    for line in zlib.decompress(data[header_end:]).decode().splitlines():
        name, role = line.split(" ", 2)[:2]  # name domain:role priority uri dispname
        entries[name] = role
    return entries


def _public_modules() -> list[str]:
    """``metann`` and its top-level modules and packages without a leading underscore.

    These are the modules users import (``metann.meta``, ``metann.data``, ``metann.train``,
    ...). The files inside a package (``metann.meta.maml``) are implementation: their
    public names are re-exported by the package's ``__all__``, which is checked.
    ``__main__`` is skipped (importing it would run the command).
    """
    return [
        "metann",
        *sorted(
            info.name for info in pkgutil.iter_modules(metann.__path__, prefix="metann.")
            if not info.name.rpartition(".")[2].startswith("_")
        ),
    ]


def _all_names() -> dict[str, set[str]]:
    """For each ``module.name`` of a public ``__all__``: every public dotted path to the same object."""
    modules = {name: importlib.import_module(name) for name in _public_modules()}
    exported = {m: list(getattr(module, "__all__", [])) for m, module in modules.items()}
    paths: dict[str, set[str]] = {}
    for m, names in exported.items():
        for name in names:
            obj = getattr(modules[m], name)
            paths[f"{m}.{name}"] = {
                f"{other}.{name}"
                for other, other_names in exported.items()
                if name in other_names and getattr(modules[other], name) is obj
            }
    return paths


def test_html_builds_without_warnings(html: Path) -> None:
    for page in ["index", "installation", "quickstart", "concepts", "tutorials/index", "api/index",
                 "benchmarks", "changelog"]:
        assert (html / f"{page}.html").is_file(), page
    assert (html / "_images" / "sine.png").is_file()  # the Quickstart figure is copied into the site
    assert 'class="wy-nav-side"' in (html / "index.html").read_text()  # the Read the Docs theme


def test_every_spec_name_is_in_the_api_reference(html: Path) -> None:
    inventory = _inventory(html / "objects.inv")
    missing = [name for name in SPEC_NAMES if name not in inventory]
    assert not missing, f"SPEC names missing from the API reference (docs/api/*.rst): {missing}"


def test_every_name_of_every_all_is_in_the_api_reference(html: Path) -> None:
    inventory = _inventory(html / "objects.inv")
    paths = _all_names()
    assert "metann.meta.MAML" in paths and "metann.data.FewShotSampler" in paths  # the walk found the packages
    missing = sorted(name for name, reachable in paths.items() if not reachable & inventory.keys())
    assert not missing, (
        f"public names (in an `__all__`) missing from the API reference: {missing}. Add an "
        "autoclass/autofunction/autodata for each to the page of its public module in docs/api/."
    )


def test_doctests_pass(tmp_path: Path) -> None:
    """Every example of the site runs: Quickstart, Concepts, Tutorials and the docstrings of the API pages."""
    out = tmp_path / "doctest"
    _sphinx("doctest", out)
    report = (out / "output.txt").read_text()
    assert "0 failures in tests" in report, report
    assert "0 failures in setup code" in report and "0 failures in cleanup code" in report, report
    for page in ["quickstart", "concepts", "tutorials/sinusoid", "tutorials/fewshot", "tutorials/distributed",
                 "api/meta"]:
        assert f"Document: {page}\n" in report, f"no doctest ran in {page}:\n{report}"


def test_distributed_tutorial_script_runs_under_torchrun(tmp_path: Path) -> None:
    """The command of the 'several processes' tutorial, on two gloo processes with a tiny budget."""
    script = DOCS / "tutorials" / "scripts" / "distributed_sine.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), "--iterations", "4", "--meta-batch", "3", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert "2 processes, 4 iterations" in done.stdout, done.stdout
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.jsonl"]
