"""Regenerate the ablation figure (per method kind: each variant at one step budget, +-1 std, seeds as dots).

Usage: python analysis/fig_ablation.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report.scripts import figure_script

if __name__ == "__main__":
    sys.exit(figure_script(__doc__, "ablation"))
