"""Stage 2, training: one loop over a step engine with a member axis (``loop``) for a lone
run (a pack of one) and a pack of cells alike, the job that runs cells (``job``), each run's
life (``cell``), the member's pieces and checkpoints (``trainer``), the objective (``losses``,
the reference; ``fast``, the fused step; ``packed``, the stacked members) and CUDA graphs."""
