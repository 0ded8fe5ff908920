"""``loralab methods``: every registered part (layer, init, optimizer), how a config selects it,
and the combinations that compose (``--combinations``)."""


def add_arguments(parser):
    parser.add_argument("--combinations", action="store_true", help="list every (layer, init, optimizer) that composes, and the refused ones with the reason")


def run(args) -> int:
    from loralab import methods

    rows = methods.describe()
    width = max(len(name) for _, name, _ in rows)
    for kind, name, summary in rows:
        part = getattr(methods, {"layer": "LAYERS", "init": "INITS", "optimizer": "OPTIMIZERS"}.get(kind, ""), {}).get(name)
        where = ""
        if kind == "init":
            where = f"  [{part.key}]"
        elif kind == "optimizer":
            where = "  [optimizer]"
        elif kind == "layer":
            where = f"  [{part.keys}]"
        elif kind == "base":
            where = "  [quantization]"
        print(f"{kind:<9}  {name:<{width}}  {summary}{where}")
    combos = methods.combinations()
    print(f"\n{len(combos)} (layer, init, optimizer) combinations compose on a float base, "
          f"{len(methods.nf4_combinations())} on an NF4 base (quantization: nf4) and "
          f"{len(methods.fp8_combinations())} on an FP8 base (quantization: fp8); the rest are refused at validation.")
    if getattr(args, "combinations", False):
        import itertools

        for layer, init, opt in itertools.product(methods.LAYERS, methods.INITS, methods.OPTIMIZERS):
            reason = methods.refusal(layer, init, opt)
            bases = [b for b in ("float", "nf4", "fp8") if (layer, init, opt) in methods.combinations(b)]
            status = f"ok ({', '.join(bases)})" if reason is None else "refused"
            print(f"  {status:<16} {layer} + {init} + {opt}" + (f"  ({reason})" if reason else ""))
    return 0
