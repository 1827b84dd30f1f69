"""``python -m cellwatch`` runs the command line."""

import sys

from cellwatch.cli import main

sys.exit(main())
