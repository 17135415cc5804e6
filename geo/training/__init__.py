"""Stage two: fitting output heads on a feature cache.

- ``config.py``: ``FitConfig`` (every option) and its resolution into ``config.json``;
- ``trainer.py``: one head's training state, the step, optimizer and schedule; ``train_together``;
- ``fit.py``: ``fit_head`` (one head); ``sweep.py``: many heads in one pass over the cache;
- ``evaluate.py``: scoring on a split of this or another cache;
- ``runs.py``: the run-directory format and ``load_head(run_dir)``.

``geo.training`` imports ``geo.heads`` and ``geo.sphere``, never ``geo.pipeline``,
``geo.inference``, ``geo.reports`` or ``geo.cli``.
"""
