python3 scripts/piggyback_gemm_bench.py --output /root/out/piggyback.json
