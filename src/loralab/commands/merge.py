"""``loralab merge``: an adapter into its base (a plain transformers checkpoint of the adapter's
task kind, head included), or a trained PiSSA/CorDA adapter into a rank-2r LoRA for the original
base (``--to-lora``). The merge is into the base the adapter trained on (its ``loralab_base.json``:
an NF4 base is re-quantised, checked and dequantised), with tied weights it touches untied. Exit 2
with the reason when it cannot be done faithfully (e.g. bitsandbytes missing for an NF4 adapter, or a CorDA
adapter whose recorded base is not the residual model it belongs to: ``merge.residual_base_problem``)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--base", help="base model (the residual model DIR for PiSSA/CorDA); default: the adapter's "
                   "base_model_name_or_path (a packaged:<name> id is resolved)")
    p.add_argument("--adapter", required=True, help="peft adapter folder (the trained one)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--to-lora", metavar="INITIAL_ADAPTER", default=None,
                   help="convert instead of merging: the initial PiSSA/CorDA adapter folder (e.g. DIR/adapter)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written checkpoint; the merge itself is done in float32 and rounded once")


def run(args) -> int:
    """0 on success; 2 with a message on stderr when the adapter cannot be merged or converted."""
    import sys

    from loralab.merge import MergeError, convert_to_lora, merge_adapter, residual_base_problem
    from loralab.models import Unreachable, adapter_base_id

    if not args.to_lora and not args.base:
        args.base = adapter_base_id(args.adapter)
        if args.base:  # the recorded base: a CorDA adapter's must be its residual model
            problem = residual_base_problem(args.adapter, args.base)
            if problem:
                print(f"error: loralab merge: {problem}", file=sys.stderr)
                return 2
    if not args.to_lora and not args.base:
        print("error: --base is required to merge when the adapter's adapter_config.json names no base model "
              "(or pass --to-lora INITIAL_ADAPTER to convert)", file=sys.stderr)
        return 2
    try:
        if args.to_lora:
            print(convert_to_lora(args.adapter, args.to_lora, args.out))
        else:
            print(merge_adapter(args.base, args.adapter, args.out, args.dtype))
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MergeError, ValueError, FileNotFoundError) as exc:
        print(f"error: loralab merge: {exc}", file=sys.stderr)
        return 2
    return 0
