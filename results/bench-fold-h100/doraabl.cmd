python3 scripts/dora_ablation_bench.py --bases fp8 bf16 --variants lora dora dora-grad-copy --micro-batch auto --refresh-forms shipped one-stream streams-8 --output /root/out/doraabl.json
