python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods lora --stacks loralab,tuned --speed memory_fraction=0.441 --output $OUT/tunedrepeat.json
