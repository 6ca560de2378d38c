"""The model shape every benchmark compares at: a ~30M-parameter Llama (HF config fields)."""

LLAMA_30M = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
