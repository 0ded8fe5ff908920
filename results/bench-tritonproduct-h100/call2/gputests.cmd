env PYTHONPATH=src:scripts:/tmp/site python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_dora_norm_per_step.py tests/test_refresh_kernel.py
