env PYTHONPATH=src:scripts:/tmp/site python3 -m pytest -q -p no:cacheprovider tests/test_dora_norm_per_step.py tests/test_fp8_kernels.py -k cuda_or_fp8_dora_step
