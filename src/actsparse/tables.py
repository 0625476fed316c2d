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

    def rich(self) -> Table:
        """The table for the terminal."""
        table = Table(title=self.title)
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True)
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
        return "\n".join(lines) + "\n"
