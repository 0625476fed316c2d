"""The result tables' rendering: figures stay whole on a narrow terminal (or a log file)."""

from io import StringIO

from rich.console import Console

from actsparse.eval.report import ResultTable


def test_a_long_label_wraps_and_every_figure_stays_whole():
    label = "8:16 amber permute+learnable policy=kl flop_share=0.55 kl_windows=2 rest=12:16 lr=0.001,0.0001"
    figures = ["21.9213", "0.136512", "0.7823", "55.1%", "0.6011", "27.6%", "1104 s"]
    table = ResultTable("gemma3-270m on sotu", ["config", "ppl", "KL", "top-1", "sparse FLOPs",
                                                "density", "removed FLOPs", "prepared in"],
                        [["dense", "19.4", "0", "1", "0.0%", "—", "—", "—"], [label, *figures]])  # fmt: skip
    out = StringIO()
    Console(file=out, width=100).print(table.rich())
    text = out.getvalue()
    assert "…" not in text and all(figure in text for figure in figures)
    assert all(word in text for word in ("8:16", "policy=kl", "rest=12:16"))  # the label wraps at spaces
