"""Recipes: one function per `minitron-nas` command, with its options (the Python API), and the stages over a run folder, each resumable."""
