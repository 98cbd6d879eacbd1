"""Model families assembled from `transformer.nn`: the encoder-decoder Transformer, a decoder-only
language model and an encoder classifier; and their FLOP counts."""
