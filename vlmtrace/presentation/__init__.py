"""Presentation: figures, the HTML report of a run, progress bars. Nothing here computes a result."""
