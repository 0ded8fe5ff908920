"""Benchmarks that sit above the library (as peft's ``method_comparison/`` sits above peft): they
call loralab's public entry points and the peers' as a user would, and record what they measure.

- ``generation``: ``loralab bench --eval``, loralab's generation engine against transformers
  ``generate`` (batched) and ``generate_batch`` (continuous batching), side by side on one device.
- ``workloads``, ``peers``, ``runner``, ``rows``: ``loralab bench [--preset]``, the peer stacks (transformers +
  peft as their docs show, Liger, the tuned peer) against the step ``loralab run`` builds, on random-weight
  shapes; ``rows`` holds the rows' text and ratios.
- ``experiment``: ``loralab bench --experiment DIR``, one recipe through ``loralab run`` and through
  transformers ``Trainer`` + peft.

Nothing below this package imports it.
"""
