"""``python -m revify.cli``: the same as the ``revify`` console script."""
import sys

from revify.cli import main

sys.exit(main())
