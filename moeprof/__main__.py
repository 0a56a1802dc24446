"""`python -m moeprof` (and `torchrun ... -m moeprof profile ...`): the command line."""

import sys

from moeprof.cli import main

sys.exit(main())
