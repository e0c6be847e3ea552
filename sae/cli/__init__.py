"""The command line around the Hydra apps: checks of overrides before Hydra composes
(``overrides``), early checks before any job (``checks``) and the ``--help`` pages (``help``)."""
