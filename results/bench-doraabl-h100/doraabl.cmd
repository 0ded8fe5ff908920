python3 scripts/dora_ablation_bench.py --bases fp8 bf16 --output /root/out/doraabl.json
