"""Regenerate the quality-matched speed-up table (the teacher budget N* matching each student, with its bootstrap
interval over training seeds and the NFE and wall-clock speed-ups) of a study.

Usage: python analysis/table_speedup.py [results/<study>] [--out DIR]
Thin wrapper: the logic lives in fsdfm.report.speedup. Ends with one JSON line (study, files, skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed

from fsdfm.report import speedup_table
from fsdfm.report.scripts import table_script

if __name__ == "__main__":
    sys.exit(table_script(__doc__, lambda study, args: [speedup_table(study)]))
