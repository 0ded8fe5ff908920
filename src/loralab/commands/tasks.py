"""``loralab tasks``: the training tasks and the evaluations (family, output type, headline metric)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    from loralab.tasks import TASKS
    from loralab.tasks.evaluate import EVALS, GROUPS

    for name, task in TASKS.items():
        print(f"{name:<20} {task.kind}")
    print("\nevaluations:")
    for name, ev in EVALS.items():
        print(f"{name:<20} {ev.family:<18} {ev.output_type:<11} {ev.headline:<12} {ev.description}")
    for name, members in GROUPS.items():
        print(f"\ngroup {name}: {', '.join(members)}")
    return 0
