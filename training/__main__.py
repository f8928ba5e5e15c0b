"""`python -m loraplex.training ...` = `loraplex train ...` (what `accelerate launch -m` starts)."""
import sys

from .cli import main

sys.exit(main())
