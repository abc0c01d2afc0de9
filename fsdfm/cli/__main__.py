"""`python -m fsdfm.cli ...`: the same as the `fsdfm` console script."""

import sys

from fsdfm.cli import main

sys.exit(main())
