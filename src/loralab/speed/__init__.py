"""Speed kernels and graph capture: fast DoRA, fused LoRA, packing, the memory-lean loss, CUDA graphs
(the step that uses them is ``loralab.run.step``)."""
