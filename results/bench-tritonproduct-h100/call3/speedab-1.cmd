env python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods fp8+lora,fp8+dora --stacks loralab --speed memory_fraction=0.441 --output /root/out/speedab-1.json
