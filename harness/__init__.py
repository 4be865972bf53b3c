"""The iomux orchestrator: brings targets up, runs the suites on each, reports.

It runs on the machine that drives the test run (never inside a target) and may
use third-party packages: the Docker SDK, pytest-testinfra, rich, matplotlib.
"""
