"""Stage 3, evaluation of a trained run: every metric of METHOD.md s4 (``evaluate``), the
raw-embedding probe computed once per embedding source (``probe_store``), contact sheets
(``inspect``) and the run's method card (``method_card``)."""
