"""The checks that only a GPU can run, as pytest tests (``scripts/gpu_check.py`` runs them and
writes the report). Every CUDA test is marked ``cuda`` and skips when
``torch.cuda.is_available()`` is False (the multi-GPU ones when fewer GPUs are visible); the
hook check also runs on CPU gloo (marked ``ddp``), so its code cannot rot on CPU-only CI."""

import os
import sys

# the tests here share helpers (gpu_helpers.py) by plain import; spawned ranks inherit sys.path
sys.path.insert(0, os.path.dirname(__file__))
