"""Shared test setup.

- Tests import their oracle helpers (hf_oracle, openai_stub) from this folder.
- Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before Triton first
  sees a kernel, i.e. before any test module imports minillavamed.kernels, hence here.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
