python -m loralab bench --eval --model random:llama-3-8b --device cuda --max-new-tokens 256 --rows generate_batch --peer-prompts 64 --output /root/out/genbatch.json
