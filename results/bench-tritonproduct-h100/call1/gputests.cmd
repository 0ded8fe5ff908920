env PYTHONPATH=src:scripts:/tmp/site python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_transpose_cache_auto.py -k cuda or refresh_product
