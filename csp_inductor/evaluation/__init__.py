"""The world csp_inductor is measured in, kept apart from the product.

``haystack`` (the VisualHaystack benchmark and the built-in model), ``train`` (its training
recipe), ``eval`` (the policies × budgets × tasks harness) and ``milebench`` (the MileBench
adapter), each with the parts it is made of beside it (``boards``, ``tasks``, ``batching``,
``builtin_model``; ``train_losses``; ``harness``, ``tables``; ``milebench_metrics``) and
reachable through it: ``csp_inductor.evaluation.haystack``,
``python -m csp_inductor.evaluation.train``, …
"""
