"""Benchmarks: PEFT methods measured side by side in one run (``make bench``).

- :mod:`benchmarks.harness`: :class:`~benchmarks.harness.Candidate` and :func:`~benchmarks.harness.measure`.
- :mod:`modalpeft.lightning.memory`: peak memory growth (process RSS on CPU, the CUDA allocator on a GPU).
- :mod:`benchmarks.report`: the Markdown table and the parameters-vs-metric plot.
- :mod:`benchmarks.run`: the ViT-B/16 run behind ``make bench``.
"""
