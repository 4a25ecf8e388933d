"""``python -m conretriever ...`` is the same as the ``conretriever`` console script."""

import sys

from conretriever.cli import main

if __name__ == "__main__":
    sys.exit(main())
