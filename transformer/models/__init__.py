"""Model families assembled from `transformer.nn`: the encoder-decoder Transformer, a decoder-only
language model, an encoder classifier and an encoder masked language model; and their FLOP counts."""
