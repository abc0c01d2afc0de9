"""Regenerate the quality (gen_ppl) vs sampling wall-clock frontier figure of a study.

Usage: python analysis/fig_frontier.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report.scripts import figure_script

if __name__ == "__main__":
    sys.exit(figure_script(__doc__, "frontier"))
