"""``loralab methods``: one line per adaptation method and how a config selects it."""


def add_arguments(parser):
    pass


def run(args) -> int:
    from loralab.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, module in METHODS.items():
        print(f"{name:<{width}}  {module.SUMMARY}")
    return 0
