"""Sphinx configuration of the metann documentation.

The build must work offline and with ``-W`` (warnings are errors): no extension here
reaches the network unless ``METANN_DOCS_INTERSPHINX=1`` is set.
"""
from __future__ import annotations

import doctest
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout, even without an editable install
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))  # this site's own extensions

# -- project -------------------------------------------------------------------------
project = "metann"
author = "the metann authors"
copyright = "the metann authors, MIT licence"  # noqa: A001 (Sphinx's name)

# The version comes from metann/_version.py, read as text so that a broken import
# cannot make the docs lie about it.
_version_text = (ROOT / "metann" / "_version.py").read_text()
release = re.search(r'__version__\s*=\s*["\']([^"\']+)["\']', _version_text).group(1)
version = ".".join(release.split(".")[:2])

# -- extensions ----------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",  # only emits a <script> tag: the build itself stays offline
    "sphinx_rtd_theme",
    "benchtable",  # docs/_ext/benchtable.py: the Benchmarks page's table, read from benchmarks.json
]

# Cross-links to the PyTorch and Python docs need their inventories from the network.
# Opt in with METANN_DOCS_INTERSPHINX=1 (never in CI or the test suite).
if os.environ.get("METANN_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
    }

templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
language = "en"
pygments_style = "sphinx"

# -- autodoc and napoleon (Google-style docstrings, see STYLE.md section 5) ----------
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
# Methods that override torch's (add_module, extra_repr, ...) must not pull in
# torch's docstrings: they are not written for this build and break -W.
autodoc_inherit_docstrings = False
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- doctest builder -------------------------------------------------------------------
# Every `>>>` block, `.. doctest::` and `.. testcode::` of the site runs here: the
# Quickstart, the Tutorials and the examples of the API reference's docstrings.
# One thread: tiny models run fastest and steadiest so, and the machine may be shared.
# DOCS_DIR lets a page find files next to it (the doctest builder runs from any cwd).
doctest_global_setup = f"""
import pathlib
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
DOCS_DIR = pathlib.Path({str(Path(__file__).resolve().parent)!r})
"""
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1

# -- HTML ------------------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_title = f"metann {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_depth": 3,
    "collapse_navigation": False,
    "style_external_links": True,
}
html_show_sourcelink = True
html_last_updated_fmt = None


# -- hooks -------------------------------------------------------------------------------
def _no_class_return_type(app, what, name, obj, options, signature, return_annotation):
    """Drop the "Return type" that autodoc records for a class from its metaclass's ``__call__``.

    ``DependentModule(module)`` goes through a metaclass ``__call__(*args, **kwargs) -> Any``,
    which would otherwise show as "Return type: Any" under the class.
    """
    if what not in ("class", "exception"):
        return
    document = getattr(app.env, "current_document", None)  # Sphinx >= 8.2
    if document is not None:
        annotations = document.autodoc_annotations
    else:  # older Sphinx (Python 3.10)
        annotations = app.env.temp_data.get("annotations", {})
    annotations.get(name, {}).pop("return", None)


def setup(app):
    # After sphinx.ext.autodoc.typehints has recorded the annotations (priority 500).
    app.connect("autodoc-process-signature", _no_class_return_type, priority=900)
