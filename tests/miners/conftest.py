import sys
from pathlib import Path

# `tests.references` must be importable however pytest is launched.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
