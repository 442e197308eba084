"""Train minimal adapters (LoRA, BitFit, prefix tuning) on a base model."""
