"""``python -m fcd_jax.convert SRC DST``: see ``fcd_jax.convert.cli``."""

import sys

from fcd_jax.convert.cli import main

sys.exit(main())
