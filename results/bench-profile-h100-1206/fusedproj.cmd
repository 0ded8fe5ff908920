python3 scripts/fused_proj_bench.py --output /root/out/fusedproj.json
