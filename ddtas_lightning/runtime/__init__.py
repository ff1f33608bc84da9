"""How a run lives and dies: building its objects (``builder``), running it (``training``), its run dir and
lock (``run_dir``), records and compute meters (``run_record``), console output (``run_output``), signals
and exit codes (``signals``, ``errors``), checkpoint I/O and compatibility (``checkpointing``,
``checkpoint_compat``), cluster and DDP glue (``cluster``, ``slurm``, ``distributed``)."""
