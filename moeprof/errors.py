"""The base class of the errors that mean "the input is wrong, and here is the fix".

Library code raises a `MoeprofError` subclass when a user's input (an argument, a file, a model, a path) cannot
be used; its message names the problem and the fix. The command line prints it as one red line and exits with
status 2. Any other exception escaping a command is a bug in moeprof, shown with its traceback.

Subclasses that replace a `ValueError` raised before also subclass `ValueError`, so `except ValueError` in
callers keeps working.
"""

from __future__ import annotations


class MoeprofError(Exception):
    """An error whose message is meant for the user: what is wrong with the input, and how to fix it."""


class InvalidArgument(MoeprofError, ValueError):
    """A value passed to moeprof (an argument, a setting, a grid) is outside what it accepts."""


class UsageError(MoeprofError, ValueError):
    """A command-line mistake the user can fix: a missing argument, two that exclude each other, a bad value."""
