import dataclasses, sys, torch
from torch.profiler import profile, ProfilerActivity
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, "src")
from loralab.speed.step import PLAIN, causal_lm_loss, compile_layers
mode = sys.argv[1]
cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=1024)
model = LlamaForCausalLM(cfg).cuda().bfloat16()
opts = dataclasses.replace(PLAIN, compile=mode != "eager", autocast="bfloat16", cudnn_attention=mode == "on")
model._loralab_speed = opts
if opts.compile:
    compile_layers(model, opts)
ids = torch.randint(0, 256, (4, 512), device="cuda")
for i in range(3):
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids}); loss.backward(); torch.cuda.synchronize()
ks = sorted({e.key[:50] for e in p.key_averages() if any(s in e.key.lower() for s in ("flash", "cudnn", "fmha", "attention"))})
print(mode, ks)
