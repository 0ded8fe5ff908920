"""Former name of ``loralab.tasks.evaluate`` (kept while other branches still import it; new code
imports ``loralab.tasks.evaluate``). ``EVALS`` now maps names to ``base.Eval`` records, which keep
the module functions' names (``load``, ``build_prompt``, ``source_generation``) and signatures."""

from loralab.tasks.evaluate import (  # noqa: F401
    EVALS,
    GROUPS,
    expand,
    generation_record,
    generation_settings,
    numeric,
    read_records,
    resolve_options,
    run_eval,
    score_generations,
    validate_options,
    write_records,
)
