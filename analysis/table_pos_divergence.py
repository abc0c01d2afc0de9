"""Regenerate the per-position divergence table (mean TV, agreement, TV slope per student and budget) of a study.

Usage: python analysis/table_pos_divergence.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report import pos_divergence_table
from fsdfm.report.scripts import table_script

if __name__ == "__main__":
    sys.exit(table_script(__doc__, lambda study, args: [pos_divergence_table(study)]))
