import sys

from l2a.cli import main

sys.exit(main())
