"""Reporting (layer with attacks, above config): the run log (``log.jsonl`` and TensorBoard, :mod:`.runlog`), plots
and Markdown tables of runs and evaluations (:mod:`.report`). Imports matplotlib lazily and nothing of atscale's upper
layers.
"""
