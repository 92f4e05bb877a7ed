"""Compare training runs by time and samples to a target eval accuracy (`python -m pipeline.compare`).

Modules, each importing only those above it:
    stats   the arithmetic on eval curves (no MLflow, no matplotlib)
    runs    reading training runs from MLflow, logging the comparison run
    report  the markdown tables
    plots   the PNG plots (matplotlib's Agg canvas on explicit Figure objects)
    cli     the command line; __main__ runs it

Nothing is imported here, so importing one module never loads the others.
"""
