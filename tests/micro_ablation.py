"""CLI overrides that make `ablate` train a micro model in seconds: enough to test the mechanics, not the loss."""

MICRO_MODEL = ["--override", "hidden_size=32", "--override", "intermediate_size=64", "--override",
               "num_hidden_layers=1", "--override", "num_attention_heads=2", "--override", "num_key_value_heads=1",
               "--override", "max_position_embeddings=64", "--override", "micro_batch_size=4",
               "--override", "batch_tokens=256", "--override", "eval_tokens=256"]
MICRO_ABLATION = [*MICRO_MODEL, "--vocab-size", "512"]  # a --tokenizer given brings its own vocabulary: MICRO_MODEL
