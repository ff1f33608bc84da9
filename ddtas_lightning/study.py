"""The learned-threshold study report: ``python -m ddtas_lightning.study ...`` (see :mod:`ddtas_lightning.report.study`)."""

import sys

from ddtas_lightning.report.study import main

if __name__ == "__main__":
    sys.exit(main())
