"""Recipes: whole stages over a run folder (run, distill, export), each resumable."""
