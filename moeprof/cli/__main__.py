"""`python -m moeprof.cli`: the command line."""

import sys

from moeprof.cli.app import main

sys.exit(main())
