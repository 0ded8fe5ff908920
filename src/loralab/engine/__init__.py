"""loralab's generation engine: continuous batching over a slot KV cache, the model's own modules.

``Engine(model).generate(prompt_ids, budgets, ...)`` -> token ids; ``loralab.tasks.generation``
wraps it as the ``engine`` backend (text in, stop strings, DDP shards). See ``engine.engine`` for
why it exists and how a call runs.
"""

from loralab.engine.engine import Ending, Engine, StopStrings
from loralab.engine.model import unsupported_reason
from loralab.engine.sampling import Sampling, request_seed

__all__ = ["Ending", "Engine", "Sampling", "StopStrings", "request_seed", "unsupported_reason"]
