import sys

from potstill.cli import main

sys.exit(main())
