"""The encoder-decoder as a CTranslate2 model (`ctranslate2.Translator(folder)`), written with
CTranslate2's Python spec API (ctranslate2.specs.TransformerSpec), so that a run can be served by
its C++ engine (CPU or GPU, float32 or int8 weights) without JAX.

What CTranslate2 does differently from this library, and how each is made to agree:

- Positions: CTranslate2's built-in sinusoid puts all sines first, then all cosines; §3.5 (and this
  library) interleaves them. The spec takes an explicit position table (`position_encodings.
  encodings`, [positions, d_model], row p for position p, starting at 0 in encoder and decoder
  alike), so the library's own table is written: the sinusoids of `sinusoidal_positional_encoding`
  for positions 0 … max_len-1, or the learned table. CTranslate2 refuses positions past the table,
  as the model refuses sequences longer than max_len.
- Embedding scale: `scale_embeddings` multiplies by √d_model, as §3.4 does; the projection gets the
  unscaled matrix (the shared one when share_embeddings: CTranslate2 stores it once, aliased).
- LayerNorm: CTranslate2 reads its epsilon from config.json's `layer_norm_epsilon`; without it its
  Transformer uses 1e-5 (measured with 4.8.5), not the library's 1e-6, so it is written explicitly
  from the run's config.
- Post-LN (the paper's) is `pre_norm=False` (each sub-layer's LayerNorm after its residual sum, no
  final LayerNorm); pre-LN is `pre_norm=True` with the stack's final LayerNorm.
- Attention: CTranslate2 fuses Q, K, V (self-attention) and K, V (encoder-decoder) into one matrix
  whose rows are head-major ([h, d] flattened), the layout of this library's [d_model, h, d] arrays
  transposed; biases are optional in the spec and left out, as the paper has none. One head size
  (`head_dim`) serves queries, keys and values, so d_k != d_v cannot be written (refused); d_k = d_v
  != d_model / h is written with `head_dim`.
- Special tokens: CTranslate2 works on token strings. The vocabulary is the tokenizer's pieces in
  id order (id i = line i, so ids map one to one); the decoder starts from the begin piece (BOS,
  "<s>") and stops at the end piece (EOS, "</s>"), as `transformer.decoding` does, and
  `add_source_eos` appends the end piece to each source, as `encode_sources` does: the user gives
  the tokenizer's pieces alone.

What is not the same: the search. Greedy decoding (beam_size=1) is the same algorithm; CTranslate2's
beam search ranks by log P / |Y|^length_penalty, not §6.1's ((5+|Y|)/6)^α, and its
`max_decoding_length` is one number per call where the library gives each sentence its own length +
50 (README.md, "Exporting for serving").
"""

from __future__ import annotations

import os
import shutil

import numpy as np

QUANTIZATIONS = ("float32", "int8")


def import_ctranslate2():
    """The ctranslate2 package, or UserError saying how to install it."""
    from transformer.run.cli import UserError

    try:
        import ctranslate2
        import ctranslate2.specs  # noqa: F401
    except ImportError:
        raise UserError("--format ctranslate2 needs the ctranslate2 package: pip install ctranslate2 "
                        "(or pip install -e .[export])") from None
    return ctranslate2


def _array(x) -> np.ndarray:
    # A writable copy: the spec's optimize() quantizes in place, and a view of a JAX array is read-only.
    return np.array(x[...], dtype=np.float32, order="C", copy=True)


def _linear(spec, kernel_in_out: np.ndarray, bias: np.ndarray | None = None) -> None:
    """A CTranslate2 LinearSpec from an [in, out] kernel: CTranslate2 stores [out, in] (y = x·Wᵀ + b)."""
    spec.weight = np.ascontiguousarray(kernel_in_out.T)
    if bias is not None:
        spec.bias = bias


def _heads(w: np.ndarray) -> np.ndarray:
    """[d_model, h, d] -> [d_model, h·d] (head-major columns: head i's d features together)."""
    return w.reshape(w.shape[0], -1)


def _layer_norm(spec, norm) -> None:
    spec.gamma = _array(norm.scale)
    spec.beta = _array(norm.bias)


def _self_attention(spec, attention, residual) -> None:
    w_q, w_k, w_v = (_heads(_array(w)) for w in (attention.w_q, attention.w_k, attention.w_v))
    _linear(spec.linear[0], np.concatenate([w_q, w_k, w_v], axis=1))
    _linear(spec.linear[1], _array(attention.w_o).reshape(-1, w_q.shape[0]))
    _layer_norm(spec.layer_norm, residual.norm)


def _cross_attention(spec, attention, residual) -> None:
    w_q, w_k, w_v = (_heads(_array(w)) for w in (attention.w_q, attention.w_k, attention.w_v))
    _linear(spec.linear[0], w_q)
    _linear(spec.linear[1], np.concatenate([w_k, w_v], axis=1))
    _linear(spec.linear[2], _array(attention.w_o).reshape(-1, w_q.shape[0]))
    _layer_norm(spec.layer_norm, residual.norm)


def _feed_forward(spec, ffn, residual) -> None:
    _linear(spec.linear_0, _array(ffn.linear_1.kernel), _array(ffn.linear_1.bias))
    _linear(spec.linear_1, _array(ffn.linear_2.kernel), _array(ffn.linear_2.bias))
    _layer_norm(spec.layer_norm, residual.norm)


def position_table(input_embedding, config) -> np.ndarray:
    """PE for positions 0 … max_len-1, [max_len, d_model] float32: exactly what `InputEmbedding`
    adds (the learned table, or §3.5's interleaved sinusoids from the library's own function)."""
    if config.positional_encoding == "learned":
        return _array(input_embedding.position_embedding)
    import jax.numpy as jnp

    from transformer.nn.embeddings import sinusoidal_positional_encoding

    return np.asarray(sinusoidal_positional_encoding(jnp.arange(config.max_len)[None, :], config.d_model)[0],
                      dtype=np.float32)


def _input_layers(spec, input_embedding, config) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _array(input_embedding.token_embedding.embedding)
    spec.scale_embeddings = True  # × √d_model (§3.4)
    spec.position_encodings.encodings = position_table(input_embedding, config)


def check_exportable(config) -> None:
    """Raise UserError for a model CTranslate2's Transformer cannot hold."""
    from transformer.run.cli import UserError

    d_k, d_v = config.head_sizes
    if d_k != d_v:
        raise UserError(f"CTranslate2 takes one head size for queries, keys and values, but this model has d_k={d_k} "
                        f"!= d_v={d_v}: export it with --format stablehlo instead")


def transformer_spec(model, tokenizer):
    """A validated `ctranslate2.specs.TransformerSpec` holding `model` (a `Transformer`) and the
    vocabulary of `tokenizer` (its pieces in id order)."""
    import_ctranslate2()
    from ctranslate2.specs import transformer_spec as ts
    from transformer.run.cli import UserError

    config = model.config
    check_exportable(config)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {config.vocab_size}: "
                        "the work dir is inconsistent")
    pieces = tokenizer.pieces(range(config.vocab_size))
    if len(set(pieces)) != len(pieces):
        raise UserError("the tokenizer's pieces are not all different, so CTranslate2's string vocabulary cannot "
                        "map them one to one to the model's ids")
    d_k, _ = config.head_sizes
    pre_norm = config.norm_position == "pre"
    # head_dim only where it departs from d_model / h (None lets CTranslate2 derive it, as usual).
    shape = dict(pre_norm=pre_norm, head_dim=None if d_k * config.h == config.d_model else d_k)
    encoder = ts.TransformerEncoderSpec(config.N, config.h, **shape)
    decoder = ts.TransformerDecoderSpec(config.N, config.h, **shape)
    spec = ts.TransformerSpec(encoder, decoder)

    _input_layers(encoder, model.src_embed, config)
    for layer_spec, layer in zip(encoder.layer, model.encoder.layers):
        _self_attention(layer_spec.self_attention, layer.self_attention, layer.self_attention_residual)
        _feed_forward(layer_spec.ffn, layer.feed_forward, layer.feed_forward_residual)
    _input_layers(decoder, model.tgt_embed, config)
    for layer_spec, layer in zip(decoder.layer, model.decoder.layers):
        _self_attention(layer_spec.self_attention, layer.self_attention, layer.self_attention_residual)
        _cross_attention(layer_spec.attention, layer.cross_attention, layer.cross_attention_residual)
        _feed_forward(layer_spec.ffn, layer.feed_forward, layer.feed_forward_residual)
    if pre_norm:
        _layer_norm(encoder.layer_norm, model.encoder.final_norm)
        _layer_norm(decoder.layer_norm, model.decoder.final_norm)
    projection = model.output_projection.linear
    if projection is None:  # §3.4: the shared matrix, [vocab, d_model], is already CTranslate2's [out, in]
        decoder.projection.weight = _array(model.tgt_embed.token_embedding.embedding)
    else:
        _linear(decoder.projection, _array(projection.kernel))

    spec.config.layer_norm_epsilon = float(config.layer_norm_epsilon)
    spec.config.unk_token = pieces[tokenizer.unk_id]
    spec.config.bos_token = pieces[tokenizer.bos_id]
    spec.config.eos_token = pieces[tokenizer.eos_id]
    spec.config.decoder_start_token = pieces[tokenizer.bos_id]
    spec.config.add_source_bos = False
    spec.config.add_source_eos = True
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.validate()
    return spec


def export_ctranslate2(model, tokenizer, tokenizer_path: str, output: str, quantization: str = "float32") -> None:
    """Write `model` as a CTranslate2 model into the new folder `output` (with `new_output_dir`: all or
    nothing), weights in `quantization` ("float32" or "int8"), and a copy of the tokenizer file."""
    from transformer.export import new_output_dir
    from transformer.run.cli import UserError

    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    spec = transformer_spec(model, tokenizer)
    spec.optimize(quantization=quantization)
    with new_output_dir(output) as folder:
        spec.save(folder)
        shutil.copy(tokenizer_path, os.path.join(folder, os.path.basename(tokenizer_path)))
