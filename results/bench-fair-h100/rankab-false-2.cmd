python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods fp8+lora --speed micro_batch=4 --speed lora_scale_at_rank=false --output /root/out/rankab-false-1.json
