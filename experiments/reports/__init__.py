"""The report layer: reads an experiment's records (experiments/record.py) and renders its pages.

- ``load``: the records as per-run rows, curves, per-episode outcomes and horizon series (reading and analysis);
- ``tables``: markdown tables and number formats;
- ``figures``: the figures (matplotlib, deterministic PNG bytes);
- ``results``, ``tuning``, ``sweeps``: one renderer per report kind (the headline evaluation, the tuning protocol,
  the learning-rate and damping sweeps).

``scripts/report.py`` is the command line; ``scripts/summary.py`` the cross-task page. Nothing here imports the
training loop (experiments.train) or a task.
"""
