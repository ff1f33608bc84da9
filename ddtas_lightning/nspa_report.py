"""The NSPA study report: ``python -m ddtas_lightning.nspa_report ...`` (see :mod:`ddtas_lightning.report.nspa`)."""

import sys

from ddtas_lightning.report.nspa import main

if __name__ == "__main__":
    sys.exit(main())
