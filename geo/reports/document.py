"""A report as a list of sections, rendered to Markdown and to one self-contained HTML page.

Blocks are text (Markdown-ish: paragraphs, ``**bold**``, ``- `` bullet lists), tables
given in both formats, and PNG figures. Markdown refers to figures as files under
``figures/``; HTML embeds them as base64 data URIs, so ``index.html`` opens offline
on its own, with no file beside it.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from geo.files import atomic_write_bytes


@dataclass
class Text:
    """Paragraphs and ``- `` bullet lists; ``**x**`` is bold and `` `x` `` code in both formats."""

    markdown: str


@dataclass
class Table:
    markdown: str
    html: str


@dataclass
class Details:
    """A one-line summary and a table that HTML folds away (<details>) and Markdown prints below the line."""

    summary: str  # Markdown-ish inline text, as in Text
    table: Table


@dataclass
class Image:
    """A PNG figure; ``name`` is its file name under figures/ (e.g. "accuracy_vs_c.png")."""

    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table.results { border-collapse: collapse; font-size: 13px; }
table.results th, table.results td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
table.results th { background: #f0f0f0; } table.results tr:nth-child(even) { background: #fafafa; }
table.results td:nth-child(-n+4) { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; } code { background: #f4f4f4; padding: 0 3px; }
.holds { color: #1a7f37; font-weight: bold; } .fails { color: #c0392b; font-weight: bold; }
.inconclusive, .not-tested { color: #9a6700; font-weight: bold; }
.not-testable-here, .not-meaningful-here { color: #777; font-weight: bold; }
details { margin: 0.6em 0; } details > table { margin: 0.4em 0 0.8em 1.2em; } summary { cursor: pointer; }
"""


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    # Verdict words get a colour class ("verdict: holds" ...).
    return re.sub(r"\b(holds|fails|inconclusive|not tested|not testable here|not meaningful here)\b",
                  lambda m: f'<span class="{m.group(1).replace(" ", "-")}">{m.group(1)}</span>', text)


def _text_html(markdown: str) -> str:
    out, items = [], []
    for paragraph in markdown.strip().split("\n\n"):
        lines = paragraph.splitlines()
        if lines and all(line.startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline_html(line[2:])}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        else:
            out.append(f"<p>{_inline_html(' '.join(lines))}</p>")
    return "\n".join(out)


_CODE_SPAN = re.compile(r"(`[^`\n]*`)")


def escape_markdown(text: str) -> str:
    """``text`` with raw HTML and link syntax neutralised, clean code spans and ``**bold**`` kept.

    Run names, ids and paths reach the report verbatim: ``<`` ``>`` ``&`` become entities and
    ``[`` ``]`` are backslash-escaped (no HTML, no links or remote images). A code span is
    kept as it is (Markdown shows it literally) unless it holds ``<``, ``>`` or ``&``: then it
    is escaped as plain text, so no raw HTML is in the file at all.
    """
    def plain(piece: str) -> str:
        return html.escape(piece, quote=False).replace("[", "\\[").replace("]", "\\]")

    parts = _CODE_SPAN.split(text)
    for i, part in enumerate(parts):  # odd pieces are code spans
        if i % 2 == 0:
            parts[i] = plain(part)
        elif any(c in part for c in "<>&"):
            parts[i] = plain(part[1:-1])
    return "".join(parts)


def render_markdown(title: str, sections: list[Section]) -> str:
    """The whole report as Markdown (figures referenced as figures/NAME.png); text escaped (``escape_markdown``)."""
    parts = [f"# {escape_markdown(title)}", ""]
    for section in sections:
        parts += [f"## {escape_markdown(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                parts += [escape_markdown(block.markdown.strip()), ""]
            elif isinstance(block, Table):
                parts += [escape_markdown(block.markdown), ""]
            elif isinstance(block, Details):
                parts += [escape_markdown(block.summary.strip()), "", escape_markdown(block.table.markdown), ""]
            elif isinstance(block, Image):
                caption = escape_markdown(block.caption)
                parts += [f"![{caption}](figures/{block.name})", "", f"*{caption}*", ""]
    return "\n".join(parts)


def render_html(title: str, sections: list[Section]) -> str:
    """The whole report as one HTML page with the figures embedded (no external references)."""
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    body = [f"<h1>{html.escape(title)}</h1>", f"<ul>{toc}</ul>"]
    for i, section in enumerate(sections):
        body.append(f'<h2 id="s{i}">{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                body.append(_text_html(block.markdown))
            elif isinstance(block, Table):
                body.append(block.html)
            elif isinstance(block, Details):
                body.append(f"<details><summary>{_inline_html(' '.join(block.summary.split()))}</summary>"
                            f"{block.table.html}</details>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.png).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_figures(sections: list[Section], out_dir: Path) -> list[Path]:
    """Write every Image block to out_dir/figures/NAME (what report.md refers to)."""
    figures = Path(out_dir) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Image):
                atomic_write_bytes(figures / block.name, block.png)
                written.append(figures / block.name)
    return written
