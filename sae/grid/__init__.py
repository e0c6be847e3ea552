"""The grid around the cells: stage 1 of a sweep (the embedding caches its cells read, each built
by its own job first), the scheduler's view of a sweep's jobs, and the status of a sweep.
Torch-free at import, like the rest of the planning code."""
