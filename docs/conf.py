"""Sphinx configuration: ``make docs`` (warnings are errors)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

import horovod_gravac  # noqa: E402

project = "horovod-gravac"
author = "horovod-gravac contributors"
copyright = "horovod-gravac contributors, Apache-2.0"
release = version = horovod_gravac.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext"]
root_doc = "index"

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# the docstrings' "Arguments:" sections are Horovod's (Google) style
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Arguments", "params_style")]
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}

html_theme = "alabaster"
html_title = f"horovod-gravac {release}"
html_static_path: list[str] = []


_LITERAL = re.compile(r"(``.*?``)")


def escape_bars(lines: list[str]) -> None:
    """The docstrings write |x| for an absolute value (plain-text math, as ‖x‖ for a norm);
    reST would read |x| as a substitution. Escape the bars outside literals and literal blocks."""
    block_indent = None  # the indentation of the paragraph that opened a literal block
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue
            block_indent = None
        if line.rstrip().endswith("::"):
            block_indent = indent
        if "|" in line:
            parts = _LITERAL.split(line)
            lines[i] = "".join(p if p.startswith("``") else p.replace("|", r"\|") for p in parts)


def process_docstring(app, what, name, obj, options, lines) -> None:
    escape_bars(lines)


class ChoicesEpilog(SphinxDirective):
    """``gravac-train --help``'s lists of models, data sets, compressors and agents, as
    ``--help`` prints them (made from the registries at build time)."""

    def run(self) -> list[nodes.Node]:
        from horovod_gravac.app.train import choices_epilog
        text = choices_epilog()
        return [nodes.literal_block(text, text)]


def setup(app):
    app.add_directive("gravac-train-choices", ChoicesEpilog)
    app.connect("autodoc-process-docstring", process_docstring)

# references to this package must resolve (a renamed class or function is a warning, and -W
# makes it an error); references to torch, Horovod, Lightning or builtins are not checked
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!horovod_gravac\b).*")]
