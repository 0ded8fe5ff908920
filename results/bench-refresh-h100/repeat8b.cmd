python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods lora,dora,fp8+lora,fp8+dora --stacks loralab --output /root/out/probe8b.json
