"""Adaptation methods: one file each, one line each in ``METHODS``.

Three variation points explain every method of the seeds: the **layer** (DoRA, magnitude-only
DoRA), the **initialisation** (PiSSA, OLoRA, CorDA, seed 003's SVD LoRA-FA) and the **optimizer**
(LoRA-FA). A method is chosen by configuration alone: the first entry below whose ``applies``
accepts (adapter_config, training_parameters) is used, most specific first.

Each module has ``NAME``, ``SUMMARY``, ``applies(cfg, params)``, ``check(model, cfg, params) ->
problems``, ``apply(model, cfg, params, ctx) -> (model, saver | None)`` and optionally
``make_optimizer(model, cfg, params)``.
"""

from loralab.methods import corda, dora, full, lora, lorafa, olora, pissa, rslora, svd_lorafa

METHODS = {
    m.NAME: m
    for m in (full, corda, pissa, olora, svd_lorafa, lorafa, dora, rslora, lora)
}


def choose_method(cfg, params):
    for method in METHODS.values():
        if method.applies(cfg, params):
            return method
    raise AssertionError("lora applies to every adapter config")
