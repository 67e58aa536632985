"""``python -m flashckpt.cli``: the ``flashckpt`` command."""

import sys

from flashckpt.cli import main

sys.exit(main())
