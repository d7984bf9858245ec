"""Models: Hugging Face loading, reward/value heads, LoRA, and the built-in tiny model."""
