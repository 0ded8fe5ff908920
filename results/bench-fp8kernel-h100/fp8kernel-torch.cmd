python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods fp8+lora --output /root/out/fp8kernel-torch.json
