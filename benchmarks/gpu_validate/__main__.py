"""bash benchmarks/gpu_validate.sh OUT_DIR ..., or python -m benchmarks.gpu_validate OUT_DIR ...
from the repository root; the steps run their helpers in a child the second way."""
import sys
from pathlib import Path

if __package__:
    from .driver import main
else:  # run as a file by gpu_validate.sh, from any folder: the package from the checkout
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    from benchmarks.gpu_validate.driver import main

sys.exit(main())
