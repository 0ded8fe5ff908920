python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods dora,fp8+dora --stacks loralab --speed dora_norm_per_step=false --output /root/out/dorab-false-1.json
