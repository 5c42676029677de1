"""What a page of the study's site must hold, read from its HTML (used by the site tests)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_FIGURE = re.compile(r"<figure\b.*?</figure>", re.S)
_CAPTION = re.compile(r"<figcaption>(.*?)</figcaption>", re.S)
_TAG = re.compile(r"<[^>]+>")


def _text(fragment: str) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", fragment)).split())


@dataclass
class Page:
    """A page's title, its first heading, its images (and which are in a captioned figure), its
    tables, and what must never be there."""

    title: str
    heading: str
    images: int
    captioned_images: int
    captions: list[str] = field(default_factory=list)
    tables: int = 0
    stderr_outputs: int = 0
    error_outputs: int = 0
    external: list[str] = field(default_factory=list)
    parameter_cells: int = 0


def read_page(text: str) -> Page:
    title = _text(re.search(r"<title>(.*?)</title>", text, re.S).group(1))
    h1 = re.search(r"<h1>(.*?)</h1>", text, re.S)
    captioned, captions = 0, []
    for fig in _FIGURE.findall(text):
        cap = _CAPTION.search(fig)
        if cap and _text(cap.group(1)).strip("#").strip():
            captioned += fig.count("<img")
            captions.append(_text(cap.group(1)).rstrip("#").strip())
    return Page(
        title=title,
        heading=_text(h1.group(1)).rstrip("#").strip() if h1 else "",
        images=text.count("<img"),
        captioned_images=captioned,
        captions=captions,
        tables=len(re.findall(r"<table\b", text)),
        stderr_outputs=len(re.findall(r'class="[^"]*\bstderr\b', text)),
        error_outputs=len(re.findall(r'class="[^"]*\b(?:traceback|error)\b', text)),
        external=re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(https?://[^"]+)"', text),
        parameter_cells=text.count("Show the parameters of this run"),
    )
