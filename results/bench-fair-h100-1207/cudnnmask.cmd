python3 scripts/cudnn_mask_nan.py --output /root/out/a/cudnn_mask_nan.json
