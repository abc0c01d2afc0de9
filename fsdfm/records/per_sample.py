"""Per-sample tables (per_sample.csv of an evaluate stage): written with floats that read back bit-exactly.

Knows the CSV format only; which folder a table lives in is `fsdfm.records.layout`'s, loading them across runs is
`fsdfm.records.loading.load_samples`.
"""

from __future__ import annotations

import csv
import io
import os

from fsdfm.io import atomic_write

PER_SAMPLE = "per_sample.csv"


def write_per_sample(path: str | os.PathLike, columns: dict) -> None:
    """Write equal-length columns {name: (N,) array} as CSV, atomically. Floats are written with `repr` (the
    shortest text that parses back to the same double), so sums over the loaded table reproduce the stage's."""
    import numpy as np  # lazy: the command line sets thread counts before numpy loads (fsdfm.cli.common)

    names = list(columns)
    arrays = [np.asarray(columns[k]) for k in names]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise ValueError(
            f"{path}: per-sample columns of different lengths: "
            + ", ".join(f"{k}={len(a)}" for k, a in zip(names, arrays))
        )

    def text(x) -> str:
        if isinstance(x, (bool, np.bool_)):
            return "True" if x else "False"
        if isinstance(x, (float, np.floating)):
            return repr(float(x))
        return str(x.item() if hasattr(x, "item") else x)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for row in zip(*arrays):
        w.writerow([text(x) for x in row])
    atomic_write(path, buf.getvalue().encode("utf-8"))


def read_per_sample(path: str | os.PathLike):
    """A per-sample table as a DataFrame, floats parsed back to the very doubles written (pandas >= 3 does so by
    default and deprecates the option; older pandas needs float_precision="round_trip")."""
    import pandas as pd  # lazy: a job process writes records without paying for pandas

    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(path, **exact)
