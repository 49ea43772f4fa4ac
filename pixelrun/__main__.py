import sys

from pixelrun.cli import main

sys.exit(main())
