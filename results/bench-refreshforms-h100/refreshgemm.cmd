python3 scripts/fp8_refresh_gemm_bench.py --output /root/out/refreshgemm.json
