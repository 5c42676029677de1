import sys

from diffpath.cli import main

sys.exit(main())
