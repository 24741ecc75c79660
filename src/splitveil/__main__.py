"""``python -m splitveil ...`` is ``splitveil ...``."""
import sys

from .cli import main

sys.exit(main())
