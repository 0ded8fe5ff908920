python -m loralab eval --model random:llama-3-8b --adapter /tmp/lora-r32-8b --tasks gsm8k --max-new-tokens 1024 --dtype bfloat16 --device cuda --output /root/out/gsm8k.json
