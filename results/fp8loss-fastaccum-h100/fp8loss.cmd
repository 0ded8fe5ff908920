python3 scripts/fp8_loss_curves.py --device cuda --variants fp32 bf16 bf16_rerun fp8 fp8_exact --output /root/out/fp8loss.json
