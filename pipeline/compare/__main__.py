"""`python -m pipeline.compare`: the CLI lives in `pipeline.compare.cli` so tests can import it."""
import sys

from pipeline.compare.cli import main

sys.exit(main())
