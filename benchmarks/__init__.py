"""Benchmarks: PEFT methods measured side by side in one run (``make bench``).

- :mod:`benchmarks.harness`: :class:`~benchmarks.harness.Candidate` and :func:`~benchmarks.harness.measure`.
- :mod:`modalpeft.lightning.memory`: peak memory growth (process RSS on CPU, the CUDA allocator on a GPU).
- :mod:`benchmarks.report`: the Markdown table and the parameters-vs-metric plot.
- :mod:`benchmarks.run` and :mod:`benchmarks.pointcloud`: the ViT-B/16 and Point-MAE runs; ``python -m benchmarks``
  (``make bench``) runs both into one run folder (``--quick``: their test-size models).
"""
