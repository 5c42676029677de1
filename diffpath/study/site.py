"""The study's pages: a small static site built from the executed notebooks.

Sphinx with myst-nb (notebooks as pages, never re-executed: ``nb_execution_mode = "off"``) and the
sphinx-book-theme: the parts Jupyter Book 1 is made of, configured here in one mapping
(:data:`SPHINX_CONFIG`) instead of Jupyter Book's ``_config.yml``/``_toc.yml`` layer. Jupyter Book 1
is in maintenance (its successor is a Node.js tool) and would add a dozen packages around the same
three; without it the build is one function call, pure Python and offline (theme, fonts and search
are local files), and the pages open from the file system.

Each page is an executed notebook (:data:`~diffpath.study.stages.SITE_PAGES`: the front page, the
walkthroughs, the report, the localisation table, the timesteps findings, the base-model
evidence), copied and prepared for a reader by :func:`prepare_page`: every code cell folded behind
a toggle ("hide-input"), one parameters cell where papermill's run left two, and links between
notebooks made links between pages. Captions come from each figure cell's ``mystnb.figure``
metadata. Pages carry no build time, so a rebuild from the same notebooks writes the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffpath.study.stages import SITE_PAGES, STAGES

__all__ = ["SPHINX_CONFIG", "prepare_page", "build_site", "study_pages", "main"]

SPHINX_CONFIG: dict[str, Any] = {
    "project": "diffpath",
    "author": "diffpath",
    "copyright": "the diffpath authors",
    "extensions": ["myst_nb"],
    "root_doc": "index",
    "language": "en",
    "nb_execution_mode": "off",          # the pipeline ran the notebooks; pages only show them
    "nb_merge_streams": True,
    "nb_output_stderr": "show",          # a warning in a record is shown, never hidden
    "nb_render_markdown_format": "myst",  # Markdown outputs (tables) as MyST
    "nb_code_prompt_show": "Show code",
    "nb_code_prompt_hide": "Hide code",
    "myst_heading_anchors": 2,
    "html_theme": "sphinx_book_theme",
    "html_title": "diffpath study",
    "html_copy_source": False,
    "html_show_sourcelink": False,
    "html_show_sphinx": False,
    "html_last_updated_fmt": None,        # no build time in the pages
    "html_theme_options": {
        "use_download_button": False,
        "use_fullscreen_button": False,
        "use_repository_button": False,
        "show_toc_level": 2,
        "home_page_in_toc": True,
    },
    "suppress_warnings": ["mystnb.unknown_mime_type"],
    "html_static_path": ["_static"],
    "html_css_files": ["study.css"],
}

#: the pages' own style: a wider column for figures and tables, images never wider than it
STUDY_CSS = """\
.bd-page-width { max-width: 100rem; }
.bd-main .bd-content .bd-article-container { max-width: 70rem; }
.bd-article img { max-width: 100%; height: auto; }
.bd-article table { font-size: 0.9em; }
"""


def _tags(cell: dict[str, Any]) -> list[str]:
    return cell.setdefault("metadata", {}).setdefault("tags", [])


def _assignments(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The literal values a parameters cell assigns, or None if it is not plain literals."""
    out: dict[str, Any] = {}
    try:
        for node in ast.parse("".join(cell.get("source", ""))).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    except (SyntaxError, ValueError):
        return None
    return out


def prepare_page(nb: Mapping[str, Any]) -> dict[str, Any]:
    """An executed notebook made a page: code folded, parameters shown once (a copy).

    Every code cell gets the ``hide-input`` tag (its outputs stay). Of the notebook's own
    ``parameters`` cell (with its comments) and papermill's ``injected-parameters`` cell, only one
    is kept: the notebook's when the run used exactly its values, else papermill's (what ran).
    """
    page = copy.deepcopy(dict(nb))
    cells = page.get("cells", [])
    own = [c for c in cells if "parameters" in _tags(c)]
    injected = [c for c in cells if "injected-parameters" in _tags(c)]
    if own and injected:
        values = {**(_assignments(own[0]) or {}), **(_assignments(injected[0]) or {})}
        same = _assignments(own[0]) == values
        _tags(injected[0] if same else own[0]).append("remove-cell")
    for cell in cells:
        tags = _tags(cell)
        if cell.get("cell_type") == "code" and "remove-cell" not in tags:
            tags.append("hide-input")
            if {"parameters", "injected-parameters"} & set(tags):
                cell["metadata"].setdefault("mystnb", {}).update(code_prompt_show="Show the parameters of this run")
        elif cell.get("cell_type") == "markdown":
            cell["source"] = _relink("".join(cell.get("source", "")))
        for out in cell.get("outputs", []):  # Markdown the notebook displayed links the same way
            if "text/markdown" in out.get("data", {}):
                out["data"]["text/markdown"] = _relink("".join(out["data"]["text/markdown"]))
    return page


#: links between notebooks (``70_walkthrough.ipynb``, as JupyterLab opens them) → pages
_NOTEBOOK_PAGES = {Path(STAGES[stage].notebook).name: page for page, stage in SITE_PAGES.items()}
_LINK = re.compile(r"\]\((?:\.\./notebooks/|notebooks/)?([0-9A-Za-z_]+\.ipynb)(#[^)]*)?\)")


def _relink(text: str) -> str:
    """Markdown links to a stage's notebook made links to its page (others unchanged)."""
    def page(m: re.Match[str]) -> str:
        target = _NOTEBOOK_PAGES.get(m.group(1))
        return m.group(0) if target is None else f"]({target}.ipynb{m.group(2) or ''})"

    return _LINK.sub(page, text)


def _toctree(pages: list[str]) -> dict[str, Any]:
    """A hidden toctree cell for the front page: the site's navigation."""
    body = "```{toctree}\n:hidden:\n:maxdepth: 1\n\n" + "\n".join(pages) + "\n```\n"
    return {"cell_type": "markdown", "id": "site-toctree", "metadata": {}, "source": body}


def _write_sources(src: Path, notebooks: Mapping[str, Path]) -> None:
    """The prepared pages under ``src`` as ``<page>.ipynb`` (the front page gets the toctree), and
    the pages' style sheet."""
    (src / "_static").mkdir()
    (src / "_static" / "study.css").write_text(STUDY_CSS)
    for page, path in notebooks.items():
        nb = prepare_page(json.loads(Path(path).read_text()))
        if page == "index":
            nb["cells"].append(_toctree([p for p in notebooks if p != "index"]))
        (src / f"{page}.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def build_site(notebooks: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike, *,
               config: Mapping[str, Any] | None = None) -> list[str]:
    """Build the site from executed notebooks (``{page: path}``, ``"index"`` among them) into
    ``out_dir`` (replaced atomically); returns Sphinx's warnings, one string each.

    ``config`` entries override :data:`SPHINX_CONFIG`.
    """
    from unittest.mock import patch

    from sphinx.application import Sphinx
    from sphinx.util.console import nocolor
    from sphinx.util.docutils import docutils_namespace

    nocolor()  # plain warnings

    if "index" not in notebooks:
        raise ValueError("the site needs a front page: a notebook for the page 'index'")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="diffpath-site-") as tmp:
        # the pages are built beside their final place (one file system for the rename); myst-nb writes
        # the outputs' images into jupyter_execute/ beside the builder's folder: inside the staging one
        src, staging = Path(tmp) / "src", out.parent / f".{out.name}.tmp"
        html = staging / "html"
        src.mkdir()
        shutil.rmtree(staging, ignore_errors=True)
        _write_sources(src, {p: Path(notebooks[p]) for p in _ordered(notebooks)})
        overrides = {**SPHINX_CONFIG, **(config or {})}
        # docutils would also read /etc/docutils.conf, ~/.docutils and ./docutils.conf (the working
        # folder's): an empty DOCUTILSCONFIG reads none, so the pages depend on the notebooks alone
        # docutils' directives and node classes are process-wide: the namespace puts them back after
        # the build, as sphinx-build does, so a second build in one process starts clean
        with patch.dict(os.environ, {"DOCUTILSCONFIG": ""}), docutils_namespace():
            app = Sphinx(str(src), None, str(html), str(Path(tmp) / "doctrees"), "html",
                         confoverrides=overrides, status=None, warning=warnings, freshenv=True, keep_going=True)
            app.build(force_all=True)
        (html / ".buildinfo").unlink(missing_ok=True)  # a hash of the settings, nothing a reader needs
        if (html / "_sources").is_dir() and not any((html / "_sources").iterdir()):
            (html / "_sources").rmdir()
        old = out.parent / f".{out.name}.old"
        if out.exists():
            out.rename(old)
        html.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return [w for w in warnings.getvalue().splitlines() if w.strip()]


def _ordered(notebooks: Mapping[str, Any]) -> list[str]:
    """Pages in :data:`~diffpath.study.stages.SITE_PAGES` order, others after them."""
    return [p for p in SITE_PAGES if p in notebooks] + [p for p in notebooks if p not in SITE_PAGES]


def study_pages(notebooks_dir: str | os.PathLike) -> dict[str, Path]:
    """``{page: executed notebook}`` of the study's pages in a profile's ``reports/notebooks``."""
    folder = Path(notebooks_dir)
    return {page: folder / Path(STAGES[stage].notebook).name for page, stage in SITE_PAGES.items()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study.site",
                                 description="Build the study's pages from its executed notebooks.")
    ap.add_argument("--notebooks", default="reports/notebooks", help="the executed notebooks (reports/notebooks)")
    ap.add_argument("--out", default="reports/site", help="the site's folder (reports/site)")
    args = ap.parse_args(argv)
    pages = study_pages(args.notebooks)
    missing = [str(p) for p in pages.values() if not p.is_file()]
    if missing:
        print(f"diffpath.study.site: error: missing executed notebooks {missing}; run `dvc repro` first",
              file=sys.stderr)
        return 2
    warnings = build_site(pages, args.out)
    for w in warnings:
        print(w, file=sys.stderr)
    print(f"{'site':26s} {len(pages):7d} pages {os.path.relpath(Path(args.out) / 'index.html')}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
