python3 scripts/fp8_cuda_check.py --output /root/out/fp8check.json
