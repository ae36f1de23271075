"""Training engines. Every engine builds `orchestrator.model.DecoderLM` from a
`ModelSpec`, loads and exports the canonical state (weights, Adam moments, step) and
takes one optimizer step per global batch; the runner drives them all the same way."""
from orchestrator.config.schema import RunConfig, StageConfig
from orchestrator.engines.local import LocalEngine


def make_engine(cfg: RunConfig, stage: StageConfig, spec):
    if cfg.engine.name == "local":
        return LocalEngine(cfg, stage, spec)
    if cfg.engine.name == "deepspeed":  # imported only here: deepspeed/megatron load slowly
        from orchestrator.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, stage, spec)
    raise ValueError(f"engine.name={cfg.engine.name!r} is not available")


__all__ = ["LocalEngine", "make_engine"]
