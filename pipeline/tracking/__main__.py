"""``python -m pipeline.tracking sync <run_dir> [--uri URI]``."""

from pipeline.tracking import main

raise SystemExit(main())
