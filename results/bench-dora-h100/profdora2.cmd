commit f37168b (launcher's LORALAB_GIT_COMMIT; the tree has no .git)
python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --methods dora --stacks loralab --profile --output $OUT/profdora2.json
