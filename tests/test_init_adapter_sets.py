from loralab.init_adapter import init_adapter_config


def test_name_lists_peft_keeps_as_sets_match_in_any_order():
    """peft saves ``exclude_modules`` (a set in ``LoraConfig``) as ``list(set)``, in an order that follows
    PYTHONHASHSEED: the experiment's own list in another order is the same setting, not a mismatch."""
    folder = {"peft_type": "LORA", "r": 4, "target_modules": ["v_proj", "q_proj"], "exclude_modules": ["b.v_proj", "a.q_proj"],
              "layers_to_transform": [1, 0]}
    own = {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["a.q_proj", "b.v_proj"], "layers_to_transform": [0, 1]}
    problems = []
    init_adapter_config(folder, own, "DIR/adapter", problems)
    assert problems == []
    init_adapter_config(folder, {"exclude_modules": ["a.q_proj"]}, "DIR/adapter", problems)
    (line,) = problems
    assert "'exclude_modules'" in line and "only the folder names 'b.v_proj'" in line
