"""The resolved schedule (resolve.py) and the checks of its stages (checks.py)."""
from orchestrator.schedule.resolve import (ResolvedStage, Schedule, effective_growth, layout_world,  # noqa: F401
                                           long_steps, max_seq_len, padded_vocab, parametrization_fields,
                                           resolve, stage_rope_scaling, stage_spec, stage_steps,
                                           step_seq_len, tokenizer_vocab, tokens_of_steps, wsd_decay_steps)
