"""`python -m minicpm_jax.cli ...` == `minicpm ...`."""

import sys

from minicpm_jax.cli import main

sys.exit(main())
