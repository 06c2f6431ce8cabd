"""``python -m pissa`` (also what torchrun launches)."""

import sys

from pissa.cli import main

sys.exit(main())
