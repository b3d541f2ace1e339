"""Sphinx directive ``.. benchmark-table:: benchmarks.json``: the results table of ``benchmarks/bench_meta.py``.

The table is built from the JSON file at documentation build time, so the page
always shows the numbers of the file next to it. Workloads and implementations keep
the order of the file; a refused implementation gets a numbered footnote with the
refusal's message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

COLUMNS = (
    "workload", "implementation", "ms / step", "time ratio (quartiles)", "peak MB", "memory ratio",
    "gradient (f64 error)",
)


def table_lines(data: dict[str, Any]) -> list[str]:
    """The reStructuredText of the table (a ``list-table``), the run's details and the footnotes."""
    lines = []
    run = data.get("run")
    if run:
        lines += [
            f"Measured {run['date']} at commit ``{run['commit']}``: torch {data['torch']}, Python {run['python']}, "
            f"{run['cpus']} CPUs, {data['threads']} thread(s) per worker, median of {run['rounds']} interleaved "
            f"rounds ({run.get('processes', 1)} worker process(es) per implementation); load average "
            f"{run['load_average'][0]} before and {run['load_average'][1]} after the run; "
            + ("glibc's malloc settings left alone." if run.get("malloc", "glibc defaults") == "glibc defaults"
               else "freed memory kept by the workers' malloc (see above)."),
            "",
        ]
    lines += [".. list-table::", "   :header-rows: 1", "   :widths: 13 18 9 16 9 9 16", ""]
    lines += ["   * - " + COLUMNS[0]] + [f"     - {c}" for c in COLUMNS[1:]]
    refusals: list[str] = []
    for workload, impls in data["results"].items():
        for impl, r in impls.items():
            if "refused" in r:
                if r["refused"] not in refusals:
                    refusals.append(r["refused"])
                cells = ["--"] * 4 + [f"refused [#refused{refusals.index(r['refused']) + 1}]_"]
            else:
                e = r["grad_error"]
                verdict = "ok" if e["ok"] else "**wrong**"
                spread = r.get("ratio_quartiles")
                cells = [
                    f"{r['median_ms']:.1f}",
                    f"**{r['ratio']:.3f}**" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""),
                    f"{r['peak_mb']:.1f}",
                    f"{r['memory_ratio']:.3f}",
                    f"{verdict} ({e['float64']:.0e})",
                ]
            lines += [f"   * - ``{workload}``", f"     - ``{impl}``"] + [f"     - {c}" for c in cells]
    lines.append("")
    for i, message in enumerate(refusals, 1):
        lines += [f".. [#refused{i}] Refused with: {message}", ""]
    return lines


class BenchmarkTable(SphinxDirective):
    """``.. benchmark-table:: path`` (relative to the page): render a ``bench_meta.py`` JSON file."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        _, path = self.env.relfn2path(self.arguments[0], self.env.docname)
        self.env.note_dependency(path)
        try:
            data = json.loads(Path(path).read_text())
            lines = table_lines(data)
        except (OSError, ValueError, KeyError) as err:
            raise self.error(f"benchmark-table: cannot read {self.arguments[0]!r}: {err}") from err
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=path), self.content_offset, container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("benchmark-table", BenchmarkTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
