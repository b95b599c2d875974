"""``python -m peft_persedit.cli``: the ``persedit`` command."""

import sys

from . import main

sys.exit(main())
