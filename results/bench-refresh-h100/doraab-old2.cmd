env PYTHONPATH=.devdata/oldsrc/src:/tmp/site python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods dora,fp8+dora --stacks loralab --output /root/out/doraab-old2.json
