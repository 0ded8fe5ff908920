env LORALAB_RESULTS_DIR=/tmp/two-gpus/res-recipe_1gpu LORALAB_OUTPUT_DIR=/tmp/two-gpus/out-recipe_1gpu /work/main/.venv/bin/python -m loralab run /tmp/two-gpus/experiments/seed000/recipe_1gpu
