"""Speed: fast DoRA, packing, memory-lean loss and the shared training step (see ``step.py``)."""
