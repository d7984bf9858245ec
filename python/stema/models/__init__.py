"""Models: Hugging Face loading, reward/value heads, LoRA, and the built-in tiny model.

- `loading`: resolve `model.path`, load tokenizer / policy / reward model (LoRA, gradient
  checkpointing), `disable_adapters` for the reference model, atomic `export_hf`.
- `value_head`: `token_values`, the PPO critic's per-token values from a sequence classifier.
- `families`: tiny models of each supported architecture family, for tests.
- `tiny`: the built-in tiny Llama and its character tokenizer.

This package imports nothing heavy: transformers and peft are imported inside the functions.
"""
