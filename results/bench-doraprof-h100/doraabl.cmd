python3 scripts/dora_ablation_bench.py --bases fp8 --variants lora dora --micro-batch auto --profile lora dora --output /root/out/doraabl.json
