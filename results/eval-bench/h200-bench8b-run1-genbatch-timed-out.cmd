python -m loralab bench --eval --model random:llama-3-8b --device cuda --max-new-tokens 256 --batch-sizes 64,128 --peer-prompts 128 --output /root/out/bench8b.json
