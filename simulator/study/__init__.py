"""Studies: many runs of one scenario and their tables.

:mod:`.compare` (strategies x seeds, ``comparison.csv``), :mod:`.sweep` (a grid of settings,
``sweep.csv``), :mod:`.executor` (runs one after another or ``--parallel``, on one Ray per
study), :mod:`.run_dirs` (where a run's folder goes and what it already holds),
:mod:`.supervisor` (the process that watches a run) and :mod:`.bench` (``protofed bench``).
"""
