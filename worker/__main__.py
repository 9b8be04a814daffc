"""``python -m worker``."""

from __future__ import annotations

import sys

from worker.cli.main import main

sys.exit(main())
