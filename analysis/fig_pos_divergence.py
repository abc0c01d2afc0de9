"""Regenerate the per-position divergence figure (TV and agreement vs position, per student and budget).

Usage: python analysis/fig_pos_divergence.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report.scripts import figure_script

if __name__ == "__main__":
    sys.exit(figure_script(__doc__, "pos_divergence"))
