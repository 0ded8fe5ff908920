python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods dora,fp8+dora --profile --output /root/out/profdora.json
