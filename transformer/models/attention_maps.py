"""Attention maps of a model, as the paper's Figures 3–5 show them: the weights softmax(Q·Kᵀ/√d_k)
of every head of every layer (§3.2.1), for one forward pass of any of the three families, and a
picture of them with the tokens on the axes.

`attention_maps(model, *inputs)` switches recording on in every `MultiHeadAttention` of the
model (`nn.attention.record_attention_weights`), runs the model once (deterministic), collects what
each module kept and switches recording off again: the hot path never records. The model's
output is the same computation with or without recording (the weights are computed beside it).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from transformer.nn.attention import MultiHeadAttention, record_attention_weights
from transformer.nn.layers import Decoder, Encoder

# The three kinds of attention of §3.2.3, by the name of the module that computes them.
KINDS = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
         "cross": "encoder-decoder attention"}


def attention_maps(model: nnx.Module, *inputs, **kwargs) -> tuple[jax.Array, dict[str, Float[Array, "b h q k"]]]:
    """`model(*inputs, **kwargs)` (deterministic), and the attention weights of every
    `MultiHeadAttention` in it: {module path: float32 [batch, h, queries, keys]}.

    Paths name the layer and the kind, e.g. "encoder/layers/0/self_attention",
    "decoder/layers/5/cross_attention" (`layer_maps` picks one layer's by kind). Runs eagerly,
    once; meant for inspection, not for the training step."""
    # Rematerialisation changes how gradients are computed, not values; it is switched off for
    # the recording pass so that what the layers keep is not inside a jax.checkpoint trace.
    stacks = [node for _, node in nnx.iter_graph(model) if isinstance(node, (Encoder, Decoder))]
    remat = [stack.remat for stack in stacks]
    for stack in stacks:
        stack.remat = "none"
    record_attention_weights(model, True)
    try:
        output = model(*inputs, deterministic=True, **kwargs)
        maps = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, MultiHeadAttention) and hasattr(node, "attention_weights"):
                maps["/".join(str(p) for p in path)] = node.attention_weights[...]
                del node.attention_weights
    finally:
        record_attention_weights(model, False)
        for stack, policy in zip(stacks, remat):
            stack.remat = policy
    return output, maps


def layer_maps(maps: dict[str, jax.Array], layer: int) -> dict[str, jax.Array]:
    """The maps of one layer (0-based) by kind ("encoder", "decoder", "cross"), those the model has:
    an encoder-decoder has all three, an LM the decoder's, a classifier the encoder's."""
    wanted = {"encoder": f"encoder/layers/{layer}/self_attention",
              "decoder": f"decoder/layers/{layer}/self_attention",
              "cross": f"decoder/layers/{layer}/cross_attention"}
    return {kind: maps[path] for kind, path in wanted.items() if path in maps}


# Picture geometry: each panel is square, PANEL_INCHES_PER_TOKEN per token of its longer side (at
# least PANEL_MIN_INCHES), at DPI dots per inch; the figure is panels side by side (heads) and one
# row per kind of attention, so its size in pixels follows from the grid alone (`figure_pixels`).
PANEL_INCHES_PER_TOKEN = 0.3
PANEL_MIN_INCHES = 3.0
DPI = 100


def panel_inches(longest: int) -> float:
    return max(PANEL_MIN_INCHES, PANEL_INCHES_PER_TOKEN * longest + 1.5)


def figure_pixels(rows: int, columns: int, longest: int) -> tuple[int, int]:
    """(width, height) in pixels of `plot_attention`'s PNG for this grid and longest token list."""
    inches = panel_inches(longest)
    return round(columns * inches * DPI), round(rows * inches * DPI)


def plot_attention(
    by_kind: dict[str, Float[Array, "h q k"]],
    labels: dict[str, tuple[Sequence[str], Sequence[str]]],
    path: str,
    heads: Sequence[int] | None = None,
    title: str = "",
):
    """Write a PNG of attention weights: one row per kind (as `layer_maps` names them), one panel per
    head (`heads`, default all); query tokens down the side, key tokens along the top, as in the
    paper's Figures 3-5. `labels[kind]` = (query pieces, key pieces). Returns the matplotlib figure
    (closed) so that callers can read its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(by_kind)
    n_heads = next(iter(by_kind.values())).shape[0]
    heads = list(range(n_heads)) if heads is None else list(heads)
    longest = max(max(len(q), len(k)) for q, k in labels.values())
    inches = panel_inches(longest)
    fig, axes = plt.subplots(len(kinds), len(heads), figsize=(len(heads) * inches, len(kinds) * inches),
                             dpi=DPI, squeeze=False)
    for row, kind in enumerate(kinds):
        weights = np.asarray(by_kind[kind], np.float32)
        queries, keys = labels[kind]
        for column, head in enumerate(heads):
            ax = axes[row, column]
            ax.imshow(weights[head], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(keys)), labels=list(keys), rotation=90, fontsize=7)
            ax.set_yticks(range(len(queries)), labels=list(queries), fontsize=7)
            ax.xaxis.tick_top()
            ax.set_title(f"{KINDS[kind]}, head {head + 1}", fontsize=8, pad=2)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9)
        top = 1.0 - 0.35 / (len(kinds) * inches)  # room for the title: about 0.35 inches
    fig.tight_layout(rect=(0, 0, 1, top))  # arranges inside the figure; its size (and the PNG's) stays as set
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig
