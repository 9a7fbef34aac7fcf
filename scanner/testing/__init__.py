"""Known-bad and known-good models for tests and ``bench/``: the attacks, the training loop, the MNIST subset.

Not part of a scan: nothing outside ``tests/`` and ``bench/`` imports this package (``tests/test_architecture.py``
checks it). The scanner never trains the model it inspects.
"""
