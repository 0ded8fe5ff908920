python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods lora,dora --stacks loralab --profile --output /root/out/profld.json
