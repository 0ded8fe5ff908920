python3 scripts/dora_ablation_bench.py --bases fp8 bf16 --variants dora dora-probe-dynamic lora lora-probe-dynamic --micro-batch auto --output /root/out/doraabl.json
