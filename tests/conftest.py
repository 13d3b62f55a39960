import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Triton decides at decoration time whether a kernel is interpreted: set before anything imports
# kernels/. Only kernels the tests ask for run this way; training runs pick torch on a CPU
# (model.kernels=auto), so this changes nothing else.
os.environ.setdefault("TRITON_INTERPRET", "1")
