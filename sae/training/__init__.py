"""Stage 2, training: one loop (``loop``) over a step engine with a member axis, for a lone
run (a pack of one) and for a pack of cells alike, and the job that runs it (``job``)."""
