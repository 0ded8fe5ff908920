python3 scripts/dora_ablation_bench.py --bases fp8 --variants lora dora --micro-batch auto --speed memory_fraction=0.441 --profile lora dora --output /root/out/doraabl.json
