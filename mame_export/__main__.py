import sys

from mame_export.cli import main

sys.exit(main())
