"""`python -m zfnet ...` (and `torchrun ... -m zfnet train ...`): the same as the `zfnet` command."""

import sys

from .cli import main

sys.exit(main())
