"""Models: tiny presets per MoE family, MoE anatomy, LoRA."""
