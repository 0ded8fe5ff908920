python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --output /root/out/fair8b.json
