"""`python -m rlhf_jax.sweep ...` (see rlhf_jax/sweep/cli.py)."""

import sys

from rlhf_jax.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
