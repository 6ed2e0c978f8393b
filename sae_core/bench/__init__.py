"""The benchmarks: scripts that print figures (`saeflow bench ...`), never assertions. Speed and
memory targets are checked here, not by timed tests.

One module per benchmark (train_step, extract, load, group, startup, hashing), each taking its options
object from `options` (where every option's default and description is declared, once; the
CLI builds its flags from them); `synthetic` and `measure` hold what several share.

May import: every room below stages.
"""
