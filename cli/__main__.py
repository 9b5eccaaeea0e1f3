"""``python -m cli``: the ``spotmesh`` command without its console script."""

import sys

from cli.main import main

sys.exit(main())
