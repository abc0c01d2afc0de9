"""Regenerate the metric-vs-step-budget figure (log2 x axis, seed bands, data reference) of a study.

Usage: python analysis/fig_step_sweep.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report.scripts import figure_script

if __name__ == "__main__":
    sys.exit(figure_script(__doc__, "step_sweep"))
