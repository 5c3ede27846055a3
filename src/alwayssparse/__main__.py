"""``python -m alwayssparse``: the same as the ``alwayssparse`` command."""

import sys

from alwayssparse.cli import main

sys.exit(main())
