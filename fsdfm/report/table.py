"""The `Table` type of the report and its number formatting: cells as strings with a bold mask and the raw numbers,
rendered as Markdown, LaTeX (booktabs) and CSV; headers carry the displayed unit and the direction arrow from the
metric's registry entry. Knows nothing about studies or which metrics a table shows (`fsdfm.report.tables`)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pandas as pd

from fsdfm.report.summary import metric_info

DASH = "—"
# display scaling by unit: (divisor, unit shown in the header)
_SCALE = {"bytes": (2.0**20, "MiB")}
_ARROW = {"min": "↓", "max": "↑", "data": "→ data", None: ""}  # by MetricInfo.goal
TIE = "≈"
UNRELIABLE = "†"
MAUVE_MIN_N = 256


# ------------------------------------------------------------------------------------------- formatting
def decimals(unit: str, value: float) -> int:
    """Digits after the point for a value of `unit` (enough to tell seeds apart, no more)."""
    if unit in ("evals", "tok/s", "MiB"):
        return 0
    if unit == "ppl":
        return 1 if abs(value) >= 100 else 2
    if unit in ("BLEU", "s"):
        return 2 if abs(value) >= 1 else 3
    return 3


def fmt_number(x: float, unit: str, ref: float | None = None) -> str:
    """`x` at the precision `decimals(unit, ref or x)`; "—" for NaN/None."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x):
        return DASH
    return f"{x:.{decimals(unit, x if ref is None else ref)}f}"


def fmt_mean_std(mean: float, std: float, n: int, unit: str) -> str:
    """ "mean ± std" (std over seeds, ddof 1); just "mean" for a single seed."""
    if pd.isna(mean):
        return DASH
    if n < 2 or pd.isna(std):
        return fmt_number(mean, unit)
    return f"{fmt_number(mean, unit)} ± {fmt_number(std, unit, ref=mean)}"


def display_unit(metric: str) -> tuple[float, str]:
    """(divisor, unit) a metric is shown in: bytes as MiB, everything else as recorded."""
    unit = metric_info(metric).unit
    return _SCALE.get(unit, (1.0, unit))


def header(metric: str) -> str:
    """Column header: name, displayed unit where it is not obvious, direction arrow ("→ data" for metrics whose
    target is the data row's value)."""
    shown = display_unit(metric)[1]
    unit = f" ({shown})" if shown in ("MiB", "s", "tok/s", "nats/token") else ""
    arrow = _ARROW[metric_info(metric).goal]
    return f"{metric}{unit} {arrow}".rstrip()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "—": "---",
    "–": "--",
    "≈": r"$\approx$",
    "†": r"$^\dagger$",
    "→": r"$\rightarrow$",
}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(s))


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Table:
    """A rendered table: `columns` headers, `cells` rows of strings, `bold` mask of the same shape, `sections`
    (row indices that open a new block: a rule is drawn above them), `notes` (printed under the table) and
    `numbers` (the raw values, written as CSV)."""

    name: str
    title: str
    columns: tuple
    cells: tuple
    bold: tuple
    sections: tuple
    notes: tuple
    numbers: pd.DataFrame
    n_label_columns: int = 3

    @property
    def empty(self) -> bool:
        return not self.cells

    def frame(self, markup: str = "") -> pd.DataFrame:
        """The cells as a DataFrame; markup "markdown" wraps bold cells in ** **."""
        rows = [
            [f"**{c}**" if (b and markup == "markdown") else c for c, b in zip(r, br)]
            for r, br in zip(self.cells, self.bold)
        ]
        return pd.DataFrame(rows, columns=list(self.columns))

    def to_markdown(self, notes: bool = True) -> str:
        if self.empty:
            return f"_{self.title}: no rows._\n"
        align = ["left"] * self.n_label_columns + ["right"] * (len(self.columns) - self.n_label_columns)
        text = self.frame("markdown").to_markdown(index=False, disable_numparse=True, colalign=align)
        if notes and self.notes:
            text += "\n\n" + "\n".join(f"* {n}" for n in self.notes)
        return text + "\n"

    def to_latex(self) -> str:
        """A booktabs tabular (needs \\usepackage{booktabs}); notes as a comment block above it."""
        k = len(self.columns)
        spec = "l" * self.n_label_columns + "r" * (k - self.n_label_columns)
        lines = [f"% {latex_escape(self.title)}"] + [f"% {n}" for n in self.notes]
        lines += [
            f"\\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(latex_escape(c) for c in self.columns) + r" \\",
            r"\midrule",
        ]
        for i, (row, brow) in enumerate(zip(self.cells, self.bold)):
            if i in self.sections and i > 0:
                lines.append(r"\midrule")
            cells = [f"\\textbf{{{latex_escape(c)}}}" if b else latex_escape(c) for c, b in zip(row, brow)]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        self.numbers.to_csv(buf, index=False)
        return buf.getvalue()
