"""Compare training runs by time and backprops to a target metric (`python -m pipeline.compare`).

Modules, each importing only those above it:
    stats    the arithmetic: eval curves, targets, spreads, t intervals, Welch (no MLflow)
    methods  runs as rows, rows grouped into methods and set against the baseline
    runs     reading training runs from MLflow, logging the comparison run
    report   the markdown report: tables, verdict lines, the regime
    plots    the PNG plots (matplotlib's Agg canvas on explicit Figure objects)
    cli      the command line; __main__ runs it

Nothing is imported here, so importing one module never loads the others (nor MLflow or
matplotlib, which only `cli.main` and `plots` import).
"""
