"""``loralab tasks``: the training tasks (and, when installed, the evaluations)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    from loralab.tasks import TASKS

    for name, task in TASKS.items():
        print(f"{name:<20} {task.kind}")
    try:
        from loralab.tasks.evaluations import EVALS
    except ImportError:
        return 0
    print("\nevaluations: " + ", ".join(sorted(EVALS)))
    return 0
