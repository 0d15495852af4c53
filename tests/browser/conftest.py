"""Browser tests share the job fixture helper that lives one folder up."""

import sys
from pathlib import Path

# tests/ has no __init__.py, so pytest puts only this folder on sys.path for these modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
