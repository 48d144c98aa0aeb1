"""`python -m lorakit …` (also what `torchrun -m lorakit train …` runs)."""

import sys

from .cli import main

sys.exit(main())
