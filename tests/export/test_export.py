"""export.py: a trained run as CTranslate2 (greedy outputs token for token, scores) and as StableHLO
(logits on batches of two shapes); bad inputs end in one line, exit code 2, nothing written."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT

# A one-layer model on a folder corpus with SentencePiece, trained (300 steps, about 20 s) until it
# translates its sentences (100 steps were enough with JAX 0.10, not with 0.12, whose random numbers
# differ): its greedy choices are then decided by clear margins, not by the
# near-ties of an untrained model, and the test compares a model that does something.
TINY = ["--d_model", "32", "--d_ff", "64", "--h", "2", "--N", "1", "--batch_tokens", "256", "--dropout_rate", "0",
        "--warmup_steps", "30", "--lr_scale", "1", "--log_every", "50", "--eval_every", "50", "--checkpoint_every", "50",
        "--bleu_examples", "0", "--quiet"]
SOURCES = ["ein hund", "zwei katzen", "der mann", "die frau", "ein kind spielt", "das haus ist rot",
           "ein mann spielt", "die katzen", "das kind ist rot"]  # the last three are not in the corpus
SUPPRESS = [["<pad>"], ["<s>"]]  # what transformer.decoding never generates (padding and the begin token)


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=ROOT)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export.py: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _write_folder(root):
    root.mkdir()
    de = ["ein hund", "zwei katzen", "der mann", "die frau", "ein kind spielt", "das haus ist rot"]
    en = ["a dog", "two cats", "the man", "the woman", "a child plays", "the house is red"]
    for split, repeat in (("train", 10), ("validation", 1)):
        (root / f"de.{split}.txt").write_text("\n".join(de * repeat) + "\n")
        (root / f"en.{split}.txt").write_text("\n".join(en * repeat) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    _write_folder(root / "data")
    result = run("train.py", "--workdir", str(root / "run"), "--dataset_dir", str(root / "data"), "--src_lang", "de",
                 "--tgt_lang", "en", "--vocab_size", "40", "--num_train_steps", "300", "--beam_size", "1", *TINY)
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.fixture(scope="module")
def model_and_tokenizer(workdir):
    from transformer.export import load_run_model

    model, tokenizer, used = load_run_model(str(workdir))
    assert used == [300]
    return model, tokenizer


@pytest.fixture(scope="module")
def ct2_float32(workdir):
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    out = workdir.parent / "ct2"
    result = run("export.py", "--workdir", str(workdir), "--format", "ctranslate2", "--output", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _library_greedy(model, tokenizer, text, max_extra=50):
    """transformer.decoding's greedy output ids for one sentence (up to its end token), with §6.1's
    limit: input length (with the end token) + max_extra, at most max_len."""
    from transformer.decoding import greedy_decode
    from transformer.decoding.text import encode_sources

    ids = encode_sources(tokenizer, [text], model.config.max_len)[0]
    extra = min(max_extra, model.config.max_len - len(ids))
    out = [int(i) for i in np.asarray(greedy_decode(model, np.asarray([ids], np.int32), extra,
                                                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)[0][0])]
    return out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out, len(ids) + extra


def _ct2_greedy(translator, tokenizer, text, limit):
    """CTranslate2's greedy output pieces for one sentence. The library's `limit` counts the end token,
    which it forces at the last position; CTranslate2 stops after max_decoding_length tokens without
    one, so its limit is one less."""
    pieces = tokenizer.processor.encode(text, out_type=str)
    result = translator.translate_batch([pieces], beam_size=1, max_decoding_length=limit - 1,
                                        suppress_sequences=SUPPRESS)
    return result[0].hypotheses[0]


def test_ctranslate2_greedy_equals_the_library_token_for_token(ct2_float32, model_and_tokenizer):
    import ctranslate2

    from transformer.decoding import translate_batches

    model, tokenizer = model_and_tokenizer
    assert sorted(os.listdir(ct2_float32)) == ["config.json", "model.bin", "shared_vocabulary.json", "spm.model"]
    translator = ctranslate2.Translator(str(ct2_float32), device="cpu")
    outputs, cut = [], 0
    for text in SOURCES:
        ids, limit = _library_greedy(model, tokenizer, text)
        pieces = _ct2_greedy(translator, tokenizer, text, limit)
        assert pieces == tokenizer.pieces(ids), text
        outputs.append(tokenizer.processor.decode(pieces))
        # The length limit's rule too: with input length + 2, longer outputs are cut.
        ids, limit = _library_greedy(model, tokenizer, text, max_extra=2)
        assert _ct2_greedy(translator, tokenizer, text, limit) == tokenizer.pieces(ids), text
        cut += len(ids) == limit - 1
    assert cut > 0
    # The text, as translate.py gives it (its batches and padding), from the tokenizer copied beside the model.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(ct2_float32 / "spm.model"))
    assert outputs == translate_batches(model, tokenizer, SOURCES, beam_size=1, batch_size=4)
    assert [sp.decode(sp.encode(t, out_type=str)) for t in SOURCES] == SOURCES
    # The model learned the corpus: a test that compared two untrained models would prove less.
    assert outputs[0] == "a dog" and outputs[3] == "the woman"


def test_ctranslate2_scores_equal_the_model_log_probabilities(ct2_float32, model_and_tokenizer):
    import ctranslate2

    model, tokenizer = model_and_tokenizer
    translator = ctranslate2.Translator(str(ct2_float32), device="cpu")
    targets = ["a dog", "the woman plays", "the house is red red"]
    sources = [tokenizer.processor.encode(t, out_type=str) for t in SOURCES[:3]]
    results = translator.score_batch(sources, [tokenizer.processor.encode(t, out_type=str) for t in targets])
    for source, target, result in zip(SOURCES, targets, results):
        src = np.asarray([tokenizer.encode(source) + [tokenizer.eos_id]], np.int32)
        tgt = tokenizer.encode(target) + [tokenizer.eos_id]
        log_p = np.asarray(jax.nn.log_softmax(model(src, np.asarray([[tokenizer.bos_id] + tgt[:-1]], np.int32))[0]))
        assert result.tokens == tokenizer.pieces(tgt)
        # float32 on both sides; the sums are ordered differently (measured: at most 5e-6).
        np.testing.assert_allclose(result.log_probs, log_p[np.arange(len(tgt)), tgt], rtol=0, atol=5e-5)


def test_ctranslate2_int8_export_loads_and_translates(workdir, model_and_tokenizer):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    _, tokenizer = model_and_tokenizer
    out = workdir.parent / "ct2-int8"
    result = run("export.py", "--workdir", str(workdir), "--format", "ctranslate2", "--quantization", "int8",
                 "--output", str(out))
    assert result.returncode == 0, result.stderr
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="int8")
    hypotheses = translator.translate_batch([tokenizer.processor.encode(t, out_type=str) for t in SOURCES[:3]],
                                            beam_size=1, max_decoding_length=20, suppress_sequences=SUPPRESS)
    vocabulary = set(tokenizer.pieces(range(tokenizer.vocab_size)))
    for h in hypotheses:
        assert h.hypotheses[0] and set(h.hypotheses[0]) <= vocabulary
    # int8 weights are a quarter of the float32 ones (the model file holds little else).
    float32 = workdir.parent / "ct2" / "model.bin"
    if float32.exists():
        assert (out / "model.bin").stat().st_size < 0.6 * float32.stat().st_size


def test_stablehlo_export_equals_the_model_on_batches_of_two_shapes(workdir, model_and_tokenizer):
    from transformer.export.stablehlo import load_stablehlo

    model, tokenizer = model_and_tokenizer
    out = workdir.parent / "stablehlo"
    result = run("export.py", "--workdir", str(workdir), "--format", "stablehlo", "--output", str(out))
    assert result.returncode == 0, result.stderr
    signature = json.loads((out / "signature.json").read_text())
    assert signature["bos_id"] == tokenizer.bos_id and signature["vocab_size"] == model.config.vocab_size
    exported = load_stablehlo(str(out))
    assert set(exported.platforms) == {"cpu", "cuda"}
    key = jax.random.key(0)
    for batch, src_len, tgt_len in ((2, 7, 5), (3, 4, 9)):
        k1, k2, key = jax.random.split(key, 3)
        src = jax.random.randint(k1, (batch, src_len), 4, model.config.vocab_size).at[:, -1].set(tokenizer.eos_id)
        src = src.at[0, -3:].set(model.config.pad_id)  # a padded row
        tgt = jax.random.randint(k2, (batch, tgt_len), 4, model.config.vocab_size).at[:, 0].set(tokenizer.bos_id)
        got = np.asarray(exported.call(src, tgt))
        assert got.shape == (batch, tgt_len, model.config.vocab_size)
        # One compiled program against the model run op by op: the same float32 arithmetic, fused
        # differently (measured: at most 1e-6).
        np.testing.assert_allclose(got, np.asarray(model(src, tgt)), rtol=0, atol=1e-5)


def test_a_cudnn_run_exports_on_a_cpu(workdir, tmp_path):
    # config.json of a GPU run: cuDNN attention (which needs bfloat16). Building it here would be a
    # ConfigError; the exporter builds it with the reference formula instead.
    import shutil

    copy = tmp_path / "gpu-run"
    shutil.copytree(workdir, copy)
    saved = json.loads((copy / "config.json").read_text())
    saved["model"].update(attention_impl="cudnn", dtype="bfloat16")
    (copy / "config.json").write_text(json.dumps(saved))
    result = run("export.py", "--workdir", str(copy), "--format", "stablehlo", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.stablehlo").stat().st_size > 0


@pytest.mark.parametrize("case", ["format", "workdir", "output", "quantization"])
def test_bad_inputs_end_in_one_line_and_write_nothing(case, workdir, tmp_path):
    args = {"--workdir": str(workdir), "--format": "ctranslate2", "--output": str(tmp_path / "out")}
    fragments = []
    if case == "format":
        args["--format"] = "onnx"
        fragments = ["--format", "invalid choice: 'onnx'"]
    elif case == "workdir":
        args.update({"--workdir": str(tmp_path / "nowhere"), "--format": "stablehlo"})  # runs without ctranslate2
        fragments = ["nowhere", "not a folder"]
    elif case == "output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        fragments = ["not empty"]
    else:
        args.update({"--format": "stablehlo", "--quantization": "int8"})
        fragments = ["--quantization applies to --format ctranslate2 only"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("export.py", *[x for kv in args.items() for x in kv])
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no model, no staging folder left
    if case == "output":
        assert os.listdir(tmp_path / "out") == ["keep.txt"] and (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_ctranslate2_missing_is_one_line_that_says_how_to_install_it(workdir, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    from transformer.run.cli import run_main

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    monkeypatch.setattr(sys, "argv", ["export.py", "--workdir", str(workdir), "--format", "ctranslate2",
                                      "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        run_main("export.py", cli.main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export.py: error: ") and "pip install ctranslate2" in err[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_ctranslate2_uses_the_runs_layer_norm_epsilon(tmp_path, norm_position):
    # LayerNorm inputs of variance ~1e-6 (tiny embeddings, learned positions): there ε = 1e-6 and
    # CTranslate2's default 1e-5 give log-probabilities apart by ~4e-4 (measured), far above the tolerance.
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    from flax import nnx

    from transformer import Transformer, TransformerConfig
    from transformer.data.tokenizer import CharTokenizer
    from transformer.export.ctranslate2 import export_ctranslate2

    tokenizer = CharTokenizer("abcdefgh")
    tokenizer.save(str(tmp_path))
    config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64, h=4, N=1, max_len=32,
                                    dropout_rate=0.0, positional_encoding="learned", norm_position=norm_position)
    model = Transformer(config, rngs=nnx.Rngs(0))
    for table in (model.src_embed.position_embedding, model.tgt_embed.position_embedding,
                  model.src_embed.token_embedding.embedding):
        table[...] = table[...] * 1e-3
    export_ctranslate2(model, tokenizer, str(tmp_path / "chars.json"), str(tmp_path / "ct2"))
    result = ctranslate2.Translator(str(tmp_path / "ct2")).score_batch([list("abcde")], [list("fgh")])[0]
    src = np.asarray([tokenizer.encode("abcde") + [tokenizer.eos_id]], np.int32)
    tgt = tokenizer.encode("fgh") + [tokenizer.eos_id]
    log_p = np.asarray(jax.nn.log_softmax(model(src, np.asarray([[tokenizer.bos_id] + tgt[:-1]], np.int32))[0]))
    np.testing.assert_allclose(result.log_probs, log_p[np.arange(len(tgt)), tgt], rtol=0, atol=2e-5)
