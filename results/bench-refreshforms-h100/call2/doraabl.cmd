python3 scripts/dora_ablation_bench.py --bases fp8 --variants lora dora --refresh-forms --output /root/out/doraabl.json
