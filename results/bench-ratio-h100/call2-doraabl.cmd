python3 scripts/dora_ablation_bench.py --bases fp8 bf16 --variants lora dora dora-ratio-in-forward --micro-batch auto --output /root/out/doraabl.json
