"""Shared test setup: tests import their oracle helpers (hf_oracle) from this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
