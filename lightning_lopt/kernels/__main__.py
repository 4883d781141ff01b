"""``python -m lightning_lopt.kernels``: build the CPU kernel ahead of time."""

import sys

from lightning_lopt.kernels import main

sys.exit(main())
