"""The benchmarks: scripts that print figures (`saeflow bench ...`), never assertions. Speed and
memory targets are checked here, not by timed tests.

May import: every room below stages.
"""
