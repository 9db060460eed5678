"""``python -m stratopy.guest`` (see :mod:`stratopy.guest.cli`)."""

import sys

from stratopy.guest.cli import main

sys.exit(main())
