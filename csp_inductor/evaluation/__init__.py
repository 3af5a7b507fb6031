"""The world csp_inductor is measured in, kept apart from the product.

``haystack`` (the VisualHaystack benchmark and the built-in model), ``train`` (its training
recipe), ``eval`` (the policies × budgets × tasks harness) and ``milebench`` (the MileBench
adapter): ``csp_inductor.evaluation.haystack``, ``python -m csp_inductor.evaluation.train``, …
"""
