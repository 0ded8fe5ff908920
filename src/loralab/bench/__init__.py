"""Benchmarks that sit above the library (as peft's ``method_comparison/`` sits above peft): they
call loralab's public entry points and the peers' as a user would, and record what they measure.

- ``generation``: ``loralab bench --eval``, loralab's generation engine against transformers
  ``generate`` (batched) and ``generate_batch`` (continuous batching), side by side on one device.

The training bench still lives in ``loralab.speed.bench`` (the shape table ``MODELS`` with it).
Nothing below this package imports it.
"""
