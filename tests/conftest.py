import os
import sys

import agvm  # noqa: F401  (first: compat patches must precede any detectron2 import)

# tests share helpers (tests/zoo.py) by plain import
sys.path.insert(0, os.path.dirname(__file__))
