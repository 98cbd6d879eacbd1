"""The paper's equations as NNX modules, one per file: attention (§3.2), the position-wise feed-forward
network (§3.3), embeddings and positional encoding (§3.4, §3.5), dropout (§5.4), masks, and the
encoder and decoder stacks built from them (§3.1)."""
