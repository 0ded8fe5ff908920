python3 scripts/fp8_loss_curves.py --device cuda --output /root/out/fp8loss.json
