"""The `ablate` stage: small llama-style models pretrained on filtered vs unfiltered data at equal tokens."""
