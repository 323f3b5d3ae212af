"""Tables in, findings and figures out: convergence stages, plots, run-folder figures.

Nothing here imports torch: a notebook can read and plot finished runs without it.
"""
