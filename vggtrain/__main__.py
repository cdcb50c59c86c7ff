import sys

from vggtrain.cli import main

sys.exit(main())
