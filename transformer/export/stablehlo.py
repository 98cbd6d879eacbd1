"""The encoder-decoder's forward pass as a serialized `jax.export` program (StableHLO), for any XLA
runtime that can load it, with no Python model code: (src_tokens, tgt_in_tokens) -> logits.

Decisions:
- Parameters are baked into the program as constants: one file is the whole model, the caller gives
  token ids only. (The file is about as big as the float32 parameters: 4 bytes each.)
- Shapes are symbolic: batch `b`, source length `s` and target length `t` are free at call time,
  with s, t <= max_len (what the model takes; the constraint is part of the program), so one
  program serves every batch shape.
- Attention is the reference formula (`transformer.export.load_run_model`): plain StableHLO that
  every platform lowers, no cuDNN custom call.
- The program is lowered for the platforms asked for (default: cpu and cuda); a caller on another
  platform gets an error from jax.export.

Written: model.stablehlo (`Exported.serialize()`; load with `jax.export.deserialize` and `.call`),
signature.json (inputs, output, special ids, the versions), and the tokenizer file.
"""

from __future__ import annotations

import json
import os
import shutil

PROGRAM_FILE = "model.stablehlo"
SIGNATURE_FILE = "signature.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def export_forward(model, platforms=DEFAULT_PLATFORMS):
    """`jax.export.Exported` of model(src_tokens, tgt_in_tokens) -> float32 logits, int32 inputs of
    symbolic shapes [b, s] and [b, t] (s, t <= max_len), parameters baked in."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    max_len = model.config.max_len

    def forward(src_tokens, tgt_in_tokens):
        return nnx.merge(graphdef, state)(src_tokens, tgt_in_tokens, right_padded=True)  # as signature() says

    b, s, t = jax.export.symbolic_shape("b, s, t", constraints=(f"s <= {max_len}", f"t <= {max_len}"))
    args = (jax.ShapeDtypeStruct((b, s), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32))
    return jax.export.export(jax.jit(forward), platforms=tuple(platforms))(*args)


def signature(model, tokenizer, exported) -> dict:
    """What a caller needs to know to feed the program (written as signature.json)."""
    import jax

    config = model.config
    return {
        "function": "logits = f(src_tokens, tgt_in_tokens)",
        "inputs": [
            {"name": "src_tokens", "dtype": "int32", "shape": ["batch", "src_len"],
             "meaning": "source ids, right-padded with pad_id, each row ending with eos_id"},
            {"name": "tgt_in_tokens", "dtype": "int32", "shape": ["batch", "tgt_len"],
             "meaning": "target ids shifted right: bos_id first, right-padded with pad_id"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "tgt_len", "vocab_size"],
                     "meaning": "logits[:, i] scores the target token after tgt_in_tokens[:, :i+1]"}],
        "constraints": [f"src_len <= {config.max_len}", f"tgt_len <= {config.max_len}"],
        "parameters": "baked into the program",
        "platforms": list(exported.platforms),
        "vocab_size": config.vocab_size,
        "max_len": config.max_len,
        "pad_id": config.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "compute_dtype": config.dtype,
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "load": "jax.export.deserialize(bytearray(open('model.stablehlo', 'rb').read())).call(src, tgt_in)",
    }


def export_stablehlo(model, tokenizer, tokenizer_path: str, output: str, platforms=DEFAULT_PLATFORMS) -> None:
    """Write the program, signature.json and the tokenizer file into the new folder `output`
    (all or nothing: `new_output_dir`)."""
    from transformer.export import new_output_dir

    exported = export_forward(model, platforms)
    blob = exported.serialize()
    with new_output_dir(output) as folder:
        with open(os.path.join(folder, PROGRAM_FILE), "wb") as f:
            f.write(blob)
        with open(os.path.join(folder, SIGNATURE_FILE), "w") as f:
            json.dump(signature(model, tokenizer, exported), f, indent=2)
        shutil.copy(tokenizer_path, os.path.join(folder, os.path.basename(tokenizer_path)))


def load_stablehlo(folder: str):
    """The exported forward function of a folder written by `export_stablehlo`: call it as
    `f.call(src_tokens, tgt_in_tokens)`."""
    import jax

    with open(os.path.join(folder, PROGRAM_FILE), "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))
