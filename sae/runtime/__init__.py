"""The process a stage runs in: the device (``device``), CPU threads (``threads``), progress
lines (``progress``), stop signals (``preemption``) and waiting on locks (``locking``)."""
