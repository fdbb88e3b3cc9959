"""`python -m recipes.cli` is `lesion`."""

import sys

from recipes.cli.app import main

sys.exit(main())
