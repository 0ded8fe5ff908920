/work/main/.venv/bin/python scripts/gpu_distributed.py speed --device cpu --shape smollm2-135m --layers 2 --length 64 --warmup 1 --steps 2 --batch 4
