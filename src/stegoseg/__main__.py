import sys

from stegoseg.cli import main

sys.exit(main())
