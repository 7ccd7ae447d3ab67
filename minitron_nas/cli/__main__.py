"""`python -m minitron_nas.cli`: the same commands as `minitron-nas`."""

from minitron_nas.cli.app import app

app()
