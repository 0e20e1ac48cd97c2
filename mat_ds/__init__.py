"""mat_ds: Modular Adaptive Training (Shi et al., NeurIPS 2023) inside a DeepSpeed engine.

    import mat_ds
    engine, optimizer, _, scheduler = mat_ds.initialize(model=model, model_parameters=model.parameters(),
                                                        config="ds_config.json")   # with a "mat" block
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        metrics = engine.mat.metrics()   # mat/active_fraction, mat/lambda_max/L{l}H{h} on refresh steps, ...

The public API: ``initialize`` (``deepspeed.initialize`` + MAT), ``MATConfig`` (the ``"mat"`` block), ``convert_model``
(what ``initialize`` does to a model first), ``make_headwise`` (mark your own model's attention), ``HeadwiseLinear``
(build attention that MAT can freeze per head), ``register_family`` / ``FamilySpec`` (teach ``initialize`` a model
family of your own: how to match, convert and probe it), ``ConfigError`` (every configuration problem, one line).
"""
from .adapters import FamilySpec, convert_model, make_headwise, register_family
from .core.config import ConfigError, MATConfig
from .core.engine import MATController
from .core.headwise import HeadwiseLinear
from .distributed import init_distributed, shutdown_distributed
from .wrapper import initialize

__all__ = ["initialize", "MATConfig", "MATController", "ConfigError", "convert_model", "make_headwise",
           "register_family", "FamilySpec", "HeadwiseLinear", "init_distributed", "shutdown_distributed"]
__version__ = "0.2.0"
