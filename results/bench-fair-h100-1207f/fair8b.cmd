python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --speed memory_fraction=0.441 --output /root/out/fair8b.json
