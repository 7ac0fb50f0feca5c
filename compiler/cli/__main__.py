"""`python -m compiler.cli`: the `recipe` command."""

import sys

from compiler.cli import main

sys.exit(main())
