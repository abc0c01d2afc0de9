"""Regenerate the sampling cost table (NFE, sampling wall-clock, tokens/s, peak memory) of a study.

Usage: python analysis/table_cost.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report import cost_table
from fsdfm.report.scripts import table_script

if __name__ == "__main__":
    sys.exit(table_script(__doc__, lambda study, args: [cost_table(study)]))
