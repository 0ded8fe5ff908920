python3 scripts/sdpa_backend_bench.py --output /root/out/sdpa.json
