"""A small markdown builder: jinja2 templates hold the prose, these helpers the table syntax.

`Markdown(folder, **filters).render(name, **context)` renders `folder/name` (a `*.md.j2` file
shipped beside the code that renders it). Blocks (`{% if %}`, `{% for %}`) on lines of their own
leave no blank line behind (trim_blocks, lstrip_blocks). In a template:

- `row(cells)`: a table row, `| a | b |`; `rule(n)`: the line under a header of n cells, `|---|---|`;
  `table(header, rows)`: header, `| --- |` rule and rows, one line each.
- `{% filter oneline %}...{% endfilter +%}`: a paragraph written over several lines comes out as one
  line (the `+` keeps the newline after it), so the prose reads well in the template and each
  paragraph stays one line in the output.
- the renderer's own filters (number formats), given as keyword arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2


def row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def rule(n: int) -> str:
    return "|" + "---|" * n


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    return "\n".join([row(header), row(["---"] * len(header)), *(row(r) for r in rows)])


def oneline(text: str) -> str:
    """The lines of a paragraph joined by single spaces, without a final newline."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


class Markdown:
    """The templates of one folder, with the helpers above and `filters`."""

    def __init__(self, folder: str | Path, **filters: Callable[..., Any]) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(folder)),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # markdown, not HTML
        )
        self.env.globals.update(row=row, rule=rule, table=table)
        self.env.filters.update(oneline=oneline, **filters)

    def render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    def lines(self, name: str, **context: Any) -> list[str]:
        """The rendered text as lines ("\\n".join gives it back); [] when it is empty."""
        text = self.render(name, **context)
        return text.split("\n") if text else []
