"""The study's pages from executed notebooks: code folded, parameters once, links between pages,
captions, offline, and the same bytes on a rebuild (on small hand-made notebooks; the pages of a
real run are checked in tests/test_study.py)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import nbformat
import pytest
from site_checks import read_page

from diffpath.study.site import build_site, prepare_page


def _png() -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _executed(title: str, own: str = 'n = 3  # how many', injected: str = "n = 3\n", link: str = "") -> dict:
    """A notebook as papermill leaves it: its parameters cell, papermill's injected copy, a figure
    with a caption, a printed line and a Markdown output."""
    v4 = nbformat.v4
    fig = v4.new_code_cell("plot()", execution_count=3, metadata={"mystnb": {"figure": {"caption": "A line."}}},
                           outputs=[v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})])
    cells = [v4.new_markdown_cell(f"# {title}\n\nSee [the walkthrough](70_walkthrough.ipynb).{link}"),
             v4.new_code_cell(own, metadata={"tags": ["parameters"]}, execution_count=1),
             v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}, execution_count=2),
             fig,
             v4.new_code_cell("print('x')", execution_count=4, outputs=[v4.new_output("stream", text="x\n")]),
             v4.new_code_cell("show()", execution_count=5, outputs=[v4.new_output(
                 "display_data", data={"text/markdown": "| a | b |\n| --- | --- |\n| 1 | [2](60_report.ipynb) |\n"})])]
    for i, c in enumerate(cells):
        c["id"] = f"c{i}"
    return json.loads(nbformat.writes(v4.new_notebook(cells=cells, metadata={"kernelspec": {"display_name": "Python (diffpath)", "language": "python", "name": "diffpath"}})))


def _tags(nb: dict) -> list[list[str]]:
    return [c["metadata"].get("tags", []) for c in nb["cells"]]


def test_a_page_folds_its_code_and_shows_the_parameters_once():
    same = prepare_page(_executed("A"))
    tags = _tags(same)
    assert "remove-cell" in tags[2] and "remove-cell" not in tags[1]  # the run used the notebook's values
    assert all("hide-input" in t for c, t in zip(same["cells"], tags) if c["cell_type"] == "code" and "remove-cell" not in t)
    other = prepare_page(_executed("A", injected="n = 5\n"))
    assert "remove-cell" in _tags(other)[1] and "remove-cell" not in _tags(other)[2]  # what ran is shown
    assert "](walkthrough.ipynb)" in "".join(same["cells"][0]["source"])  # links follow the pages
    assert "](report.ipynb)" in same["cells"][5]["outputs"][0]["data"]["text/markdown"]
    assert "hide-input" not in _executed("A")["cells"][3]["metadata"].get("tags", [])  # a copy


def test_the_site_is_offline_captioned_and_the_same_bytes_on_a_rebuild(tmp_path):
    notebooks = {}
    for page, title in (("index", "The study"), ("walkthrough", "A walkthrough"), ("report", "The report")):
        notebooks[page] = tmp_path / f"{page}_run.ipynb"
        notebooks[page].write_text(json.dumps(_executed(title)))
    warnings = build_site(notebooks, tmp_path / "site")
    assert not warnings, warnings
    for page, title in (("index", "The study"), ("walkthrough", "A walkthrough"), ("report", "The report")):
        got = read_page((tmp_path / "site" / f"{page}.html").read_text())
        assert got.title == f"{title} — diffpath study" and got.heading == title
        assert got.images == got.captioned_images == 1 and got.captions == ["A line."]
        assert got.tables == 1 and got.external == [] and got.parameter_cells == 1
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="walkthrough.html"' in index and 'href="report.html"' in index  # navigation and links
    build_site(notebooks, tmp_path / "again")
    files = sorted(p.relative_to(tmp_path / "site") for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    changed = [f for f in files if (tmp_path / "site" / f).read_bytes() != (tmp_path / "again" / f).read_bytes()]
    assert not changed, changed
    # nothing but the two sites beside them (myst-nb's jupyter_execute/ and the staging folder stay inside the build)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("_run.ipynb")) == ["again", "site"]


def test_the_site_needs_a_front_page(tmp_path):
    with pytest.raises(ValueError, match="front page"):
        build_site({"walkthrough": tmp_path / "x.ipynb"}, tmp_path / "site")


def test_missing_notebooks_are_one_line(tmp_path, capsys):
    from diffpath.study.site import main

    assert main(["--notebooks", str(tmp_path), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffpath.study.site: error: missing executed notebooks") and "dvc repro" in err
    assert not Path(tmp_path / "site").exists()


def test_colour_images_are_drawn_in_colour(tmp_path):
    """A 3-channel image in a gray row keeps its colours (a red square stays red)."""
    import numpy as np
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    from diffpath.study.figures import Row, map_rows

    img = -np.ones((3, 16, 16), np.float32)
    img[0, 4:12, 4:12] = 1.0  # a red square on black, in [-1, 1]
    fig = map_rows([Row("x0", [img]), Row("map", [img], cmap="viridis", vmin=-1, vmax=1)], ["image"], size=2)
    fig.savefig(tmp_path / "f.png", dpi=60)
    a = np.asarray(Image.open(tmp_path / "f.png").convert("RGB"), float)
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    assert red.sum() > 50


def test_two_builds_in_one_process_give_no_warnings(tmp_path):
    """Sphinx registers docutils nodes process-wide; a second build (another page set, another test
    in the same worker, a notebook kernel) must not warn that they are registered already."""
    notebooks = {}
    for page, title in (("index", "The study"), ("walkthrough", "A walkthrough"), ("report", "The report")):
        notebooks[page] = tmp_path / f"{page}_run.ipynb"
        notebooks[page].write_text(json.dumps(_executed(title)))
    assert build_site(notebooks, tmp_path / "one") == []
    assert build_site(notebooks, tmp_path / "two") == []
