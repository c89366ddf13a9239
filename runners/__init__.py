"""Runners: training/evaluation loops, LR schedules and the command-line entry points.

Importing the package registers the built-in LR schedules (registry.lr_schedulers) and runners
(registry.runners): ``runner_base`` (epoch-based) and ``runner_iter`` (iteration-based).
"""
from runners import lr_schedulers, runner_base, runner_iter  # noqa: F401  (imported for registration)
