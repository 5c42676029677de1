"""``python -m diffpath.study STAGE [ITEM]``: run one stage of the study (see :mod:`diffpath.study.stages`)."""

import sys

from diffpath.study.stages import main

sys.exit(main())
