"""The report as one self-contained HTML file, `report/index.html`: the Markdown index rendered (Python-Markdown,
tables extension), every figure embedded as a base64 PNG data URI, and every table of the report inline (the index
shows the main ones and links the rest; the HTML shows them all), so the one file is the deliverable.

Knows the index's Markdown and the written files; computes nothing.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Sequence

from fsdfm.report.table import Table

HTML_FILE = "index.html"
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _embed_images(markdown_text: str, base: Path) -> str:
    """Replace each `![alt](file.png)` whose file exists under `base` by a data: URI holding its bytes."""

    def one(m: re.Match) -> str:
        path = base / m.group(2)
        if not path.is_file():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    return _IMAGE.sub(one, markdown_text)


def html_report(title: str, index_markdown: str, tables: Sequence[Table], base: Path) -> str:
    """The HTML text of the report: `index_markdown` (figure paths relative to `base`) with its PNGs embedded,
    then a section holding every table in `tables` in full (with its notes)."""
    import markdown

    parts = [_embed_images(index_markdown, Path(base))]
    if tables:
        parts += ["", "## All tables", ""]
        for t in tables:
            parts += [f"### {t.title}", "", f'<a id="{html.escape(t.name)}"></a>', "", t.to_markdown(), ""]
    body = markdown.markdown("\n".join(parts), extensions=["tables"], output_format="html")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
