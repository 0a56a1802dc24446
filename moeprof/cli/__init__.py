"""The `moeprof` command line: `main(argv)` runs one command (`moeprof.cli.app`), `build_parser()` builds its parser."""

from moeprof.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
