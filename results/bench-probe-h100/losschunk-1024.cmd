python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods lora,fp8+lora --stacks loralab --speed loss_chunk_size=1024 --output /root/out/losschunk-1024.json
