"""End-to-end fine-tuning (`geo finetune`): backbone and a trained head together, the head's own loss.

The one place that needs both stages: images and backbones (``geo.pipeline``) and heads,
their optimizer, schedule, run format and evaluation (``geo.training``). ``geo.pipeline``
must never import heads or training, and ``geo.training`` never imports ``geo.pipeline``
(pyproject's import-linter contracts), so this step lives in its own layer, above both
and imported only by ``geo.cli``.
"""
