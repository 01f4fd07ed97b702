"""Config, grid, runner, result store, reports and the ``bench`` CLI."""

__version__ = "0.2.0"
