"""Training engines: one model definition (`orchestrator.model`), run by the `local` engine
(plain PyTorch, one process) or the `deepspeed` engine (Megatron TP + DeepSpeed pipeline and
ZeRO). `registry` says which exist and what each can do; `base.Engine` is their interface."""
