"""``python -m aq_brevitas.cli``: the ``aq-brevitas`` command."""

import sys

from . import main

sys.exit(main())
