"""One renderer for result tables: titled rows of formatted cells, drawn for the terminal (rich)
or as Markdown (docs). Evaluation and sweeps each say which columns they show; this draws them."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table


@dataclass(frozen=True)
class ResultTable:
    """A title, column titles, and rows of formatted cells (the first column names the row)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    source: str = ""
    """Where the figures come from (``evaluate.provenance_line``), under the Markdown table."""

    def rich(self) -> Table:
        """The table for the terminal. Where it is too narrow (or 120 columns, when the output is
        not a terminal), long labels wrap and every figure stays whole."""
        table = Table(title=self.title)
        table.add_column(self.columns[0], overflow="fold")
        for index, column in enumerate(self.columns[1:], start=1):
            widest = max((len(row[index]) for row in self.rows), default=0)
            table.add_column(column, justify="right", no_wrap=True, min_width=widest)
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        """The table as Markdown, under its title in bold."""
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|---|" + "---:|" * (len(self.columns) - 1),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += ["", self.source] if self.source else []
        return "\n".join(lines) + "\n"
