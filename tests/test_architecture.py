"""The layers of docs/ARCHITECTURE.md hold: saliency knows a model, not a predictor."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT_ROOT


def test_saliency_imports_nothing_of_inference():
    code = ("import sys, medcls.saliency; "
            "assert 'medcls.inference' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)
