python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods lora,fp8+lora --stacks loralab --profile --speed memory_fraction=0.441 --output /root/out/profld.json
