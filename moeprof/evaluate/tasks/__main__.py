"""`python -m moeprof.evaluate.tasks [list | path | prepare [NAME ...]]` (see moeprof.evaluate.tasks)."""

from moeprof.evaluate.tasks import main

main()
