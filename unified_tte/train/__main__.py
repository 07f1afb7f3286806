"""`python -m unified_tte.train RECIPE.yaml` (what `deepspeed --module unified_tte.train` runs)."""
import sys

from .loop import train_main

sys.exit(train_main())
