python3 -m loralab bench --experiment experiments/llm/seed000-llama3-8b-math/lora --random-weights --task gsm8k --steps 5 --device cuda --output /root/out/recipe.json
