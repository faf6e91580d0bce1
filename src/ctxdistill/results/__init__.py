"""Results as data: run records -> tables -> renderers (text, Markdown, CSV, LaTeX, PNG, W&B).

Layers, each importing only those before it: ``metrics`` (declarations) and ``stats`` (intervals, tests);
``wandb_runs`` and ``records`` (runs read from disk or W&B); ``table``; ``render`` and ``plots``;
``scorecard`` (records against the papers' reported numbers); ``files`` and ``wandb_outputs``; ``cli``
(ctxdistill-compare). Nothing here imports the rest of the package but ``cli``'s W&B mode lookup.
"""
