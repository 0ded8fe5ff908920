python3 scripts/refresh_product_sweep.py --output /root/out/sweep.json
