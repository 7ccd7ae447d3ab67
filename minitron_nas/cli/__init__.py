"""The command line: one typer command per recipe, with one-line errors and interrupt handling."""

from minitron_nas.cli.app import app

__all__ = ["app"]
