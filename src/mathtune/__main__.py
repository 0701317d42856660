"""`python -m mathtune` (and `accelerate launch -m mathtune ...`)."""

import sys

from mathtune.cli import main

sys.exit(main())
