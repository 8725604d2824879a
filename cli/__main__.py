"""`python -m modification.cli ...` runs the `modification` command (the release and the demo run each step so)."""

import sys

from .main import main

sys.exit(main())
