"""Make ``tests.servers`` and ``tests.infra.*`` importable however pytest is launched.

``.venv/bin/pytest`` does not put the repository root on ``sys.path`` (``python -m
pytest`` does); setting ``pythonpath = ["."]`` in pyproject's pytest options makes this
unnecessary.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
