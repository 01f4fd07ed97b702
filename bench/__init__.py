"""Config, grid, runner, result store, reports and the ``bench`` CLI."""

__version__ = "0.1.0"
