"""Prompt templates of the instruction-tuning sources, verbatim (whitespace is part of the string).

- ``ALPACA_NO_INPUT`` / ``ALPACA_INPUT``: Stanford Alpaca ``train.py`` ``PROMPT_DICT``. MetaMath's
  ``train_math.py`` and CorDA's ``train_model.py`` (the ``PROMPT`` used by seeds 000 and 001 for
  MetaMathQA, CodeFeedback and WizardLM) use the no-input one; the response is appended right
  after ``### Response:`` with no separator.
- ``DORA_NO_INPUT`` / ``DORA_INPUT``: LLM-Adapters / NVlabs DoRA ``commonsense_reasoning/finetune.py``
  ``generate_prompt``: a triple-quoted f-string whose 16-space indents, the two spaces after
  "request." (one in the input variant) and the indented blank lines are all in the training text.
- ``PEFT_MC_QUERY``: peft ``method_comparison/MetaMathQA`` ``default_training_params.json``
  ``query_template``; the response follows with no separator.
"""

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

_INDENT = " " * 16

DORA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}{{output}}"
)

DORA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Input:\n"
    f"{_INDENT}{{input}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}{{output}}"
)

PEFT_MC_QUERY = "Question: {query} Think step by step.\nAnswer:"


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Stanford Alpaca's rule: the input variant only when ``input`` is a non-empty string."""
    if input_text:
        return ALPACA_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def dora_prompt(instruction: str, input_text: str, output: str) -> str:
    """DoRA/LLM-Adapters' rule: the input variant when ``input`` is truthy; the output is part of the text."""
    if input_text:
        return DORA_INPUT.format(instruction=instruction, input=input_text, output=output)
    return DORA_NO_INPUT.format(instruction=instruction, output=output)
