"""``python -m atscale ...`` is the same as the ``atscale`` console script."""
import sys

from atscale.cli import main

sys.exit(main())
