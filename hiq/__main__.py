"""``python -m hiq`` runs the ``hiq`` command (for environments where the console script is not installed)."""

from hiq.cli import main

raise SystemExit(main())
