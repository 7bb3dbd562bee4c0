"""Evaluating trained runs: accuracy (``evaluate``), per-image tables (``embed``), profiles and the field's
profiling metrics (``profiles``, ``normalize``, ``mean_ap``, ``profile_report``), leave-one-compound-out
(``loco``) and plots of a run (``plots``)."""
