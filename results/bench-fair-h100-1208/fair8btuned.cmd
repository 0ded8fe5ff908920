python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --stacks loralab,tuned --windows 1 --output /root/out/fair8btuned.json
