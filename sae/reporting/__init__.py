"""Stage 4: a finished sweep directory -> the paper's comparisons (METHOD.md s5-s7).

The pieces, each a small module with pure functions on a pandas table of runs:

* :mod:`~sae.reporting.collect`   cells.json + run directories -> one row per cell, curves
* :mod:`~sae.reporting.aggregate` mean +- std over seeds, the cell labels, the metric specs
* :mod:`~sae.reporting.tables`    Markdown and LaTeX tables in the paper's shape
* :mod:`~sae.reporting.stats`     seed-paired differences, Student-t intervals, verdict rules
* :mod:`~sae.reporting.claims`    the five claims of METHOD.md s5, and the s6 reference numbers
* :mod:`~sae.reporting.plots`     matplotlib PNGs (Agg backend)
* :mod:`~sae.reporting.card`      the sweep's method card, seed stability filled in
* :mod:`~sae.reporting.html`      index.html over all of the above (relative links)

``sae.report.build_report`` runs them in order; ``python -m sae.report SWEEP_DIR`` is the CLI.
"""

from sae.reporting.claims import Claim, Tolerances, check_claims

__all__ = ["Claim", "Tolerances", "check_claims"]
