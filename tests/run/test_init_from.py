"""--init_from: another run's checkpoint read without its model, matched by path into a new model."""

import dataclasses
import functools
import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.config import TransformerConfig
from transformer.models.transformer import Transformer, TransformerClassifier, TransformerLM
from transformer.run.checkpoint import Checkpoints
from transformer.run.cli import UserError
from transformer.run.init_from import (
    InitReport, format_report, init_params, load_matching, parse_source, read_params, write_report,
)
from transformer.training import TrainConfig, create_train_state
from transformer.training.optimizer import parameter_paths

MODEL = TransformerConfig.tiny(vocab_size=24, d_model=16, d_ff=24, h=2, N=2, dropout_rate=0.0)
Classifier = functools.partial(TransformerClassifier, num_classes=3)


def _save_run(workdir, model_config=MODEL, steps=(1,)):
    """A work dir whose checkpoints hold encoder-decoder train states, step s from seed s."""
    checkpoints = Checkpoints(str(workdir))
    states = {}
    try:
        for s in steps:
            _, states[s], _ = create_train_state(model_config, TrainConfig(seed=s))
            checkpoints.save(s, states[s], {"step": s})
    finally:
        checkpoints.close()
    return {s: {p: np.asarray(x) for p, x in parameter_paths(state.params).items()} for s, state in states.items()}


def _params(model_cls, config=MODEL, seed=7):
    return nnx.split(model_cls(config, rngs=nnx.Rngs(params=seed)), nnx.Param)


def _host(state):
    return {p: np.asarray(x) for p, x in parameter_paths(state).items()}


def _assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_read_params_names_the_parameters_as_a_live_model_does(tmp_path):
    saved = _save_run(tmp_path, steps=(3,))[3]
    source, step = read_params(str(tmp_path))
    assert step == 3
    assert sorted(source) == sorted(saved)  # the same paths
    assert "encoder/layers/1/self_attention/w_q" in source and "decoder/layers/0/cross_attention/w_o" in source
    # §3.4: one shared matrix, stored once, under the first module that holds it.
    assert "src_embed/token_embedding/embedding" in source and "tgt_embed/token_embedding/embedding" not in source
    for path in saved:
        _assert_bits_equal(source[path], saved[path])


def test_the_same_model_loads_every_parameter_bit_for_bit(tmp_path):
    saved = _save_run(tmp_path, steps=(1,))[1]
    graphdef, target = _params(Transformer)
    state, report = init_params(target, str(tmp_path))
    assert (report.step, report.new, report.skipped, report.unused, report.aliased) == (1, (), {}, (), {})
    assert sorted(report.loaded) == sorted(saved)
    loaded = _host(state)
    for path in saved:
        _assert_bits_equal(loaded[path], saved[path])
    model = nnx.merge(graphdef, state)  # a State of the model's own structure
    _assert_bits_equal(np.asarray(model.encoder.layers[1].self_attention.w_k[...]),
                       saved["encoder/layers/1/self_attention/w_k"])


def test_a_classifier_from_an_encoder_decoder_takes_its_encoder_and_source_embedding(tmp_path):
    saved = _save_run(tmp_path)[1]
    _, target = _params(Classifier)
    initial = _host(target)
    state, report = init_params(target, str(tmp_path))
    encoder = [p for p in saved if p.startswith("encoder/")]
    assert sorted(report.loaded) == sorted(["embed/token_embedding/embedding", *encoder])
    assert report.aliased == {"embed/token_embedding/embedding": "src_embed/token_embedding/embedding"}
    assert report.new == ("classifier/bias", "classifier/kernel")
    assert sorted(report.unused) == sorted(p for p in saved if p.startswith("decoder/"))
    loaded = _host(state)
    _assert_bits_equal(loaded["embed/token_embedding/embedding"], saved["src_embed/token_embedding/embedding"])
    for path in encoder:
        _assert_bits_equal(loaded[path], saved[path])
    for path in report.new:  # the head stays as initialised
        _assert_bits_equal(loaded[path], initial[path])


def test_an_lm_from_an_encoder_decoder_takes_its_decoder_and_target_embedding():
    # Separate embeddings and learned positions: src_embed/ and tgt_embed/ each hold a table and positions.
    config = dataclasses.replace(MODEL, share_embeddings=False, positional_encoding="learned")
    source = _host(_params(Transformer, config, seed=0)[1])
    state, report = load_matching(_params(TransformerLM, config)[1], source)
    assert report.aliased == {"embed/position_embedding": "tgt_embed/position_embedding",
                              "embed/token_embedding/embedding": "tgt_embed/token_embedding/embedding"}
    assert report.new == () and report.skipped == {}
    assert set(report.unused) == ({p for p in source if p.startswith("src_embed/") or p.startswith("encoder/")}
                                  | {p for p in source if "/cross_attention" in p})
    loaded = _host(state)
    _assert_bits_equal(loaded["embed/token_embedding/embedding"], source["tgt_embed/token_embedding/embedding"])
    _assert_bits_equal(loaded["decoder/layers/1/self_attention/w_q"], source["decoder/layers/1/self_attention/w_q"])
    _assert_bits_equal(loaded["output_projection/linear/kernel"], source["output_projection/linear/kernel"])

    # Shared (§3.4): the one matrix is under src_embed/ only, and it is the decoder's embedding too.
    shared = _host(_params(Transformer, MODEL, seed=0)[1])
    state, report = load_matching(_params(TransformerLM)[1], shared)
    assert report.aliased == {"embed/token_embedding/embedding": "src_embed/token_embedding/embedding"}
    _assert_bits_equal(_host(state)["embed/token_embedding/embedding"], shared["src_embed/token_embedding/embedding"])


def test_a_shape_mismatch_is_skipped_with_the_reason(tmp_path):
    saved = _save_run(tmp_path)[1]
    _, target = _params(Classifier, dataclasses.replace(MODEL, vocab_size=30))  # another vocabulary
    initial = _host(target)
    state, report = init_params(target, str(tmp_path))
    assert report.skipped == {"embed/token_embedding/embedding": "shape (24, 16) in source, (30, 16) here"}
    assert "src_embed/token_embedding/embedding" not in report.unused  # matched by name: reported as skipped
    loaded = _host(state)
    _assert_bits_equal(loaded["embed/token_embedding/embedding"], initial["embed/token_embedding/embedding"])
    _assert_bits_equal(loaded["encoder/layers/0/feed_forward/linear_2/kernel"],
                       saved["encoder/layers/0/feed_forward/linear_2/kernel"])


def test_nothing_matching_is_a_user_error():
    _, target = _params(Classifier)
    narrow = _host(_params(Transformer, dataclasses.replace(MODEL, d_model=8, d_ff=12), seed=0)[1])
    with pytest.raises(UserError) as err:
        load_matching(target, narrow, source_name="runs/small")
    # The embedding and the 2 · 12 encoder parameters match by name; every one is narrower (d_model 8).
    assert str(err.value) == ("no parameter of runs/small matches this model: 25 have a parameter's name but "
                              "another shape, e.g. embed/token_embedding/embedding: shape (24, 8) in source, "
                              "(24, 16) here")
    other = {"vision/patch/kernel": np.zeros((3, 3), np.float32)}
    with pytest.raises(UserError) as err:
        load_matching(target, other, source_name="runs/vit")
    assert str(err.value) == ("no parameter of runs/vit matches this model: the names differ (the source has "
                              "vision/patch/kernel; this model classifier/bias, classifier/kernel, "
                              "embed/token_embedding/embedding, …)")


def test_no_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder: give the work dir of a train.py run"):
        read_params(str(tmp_path / "absent"))
    with pytest.raises(UserError, match="no checkpoints/ folder in"):
        read_params(str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing made in a folder that is not a run
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no checkpoint in .*: --init_from needs a run that saved one"):
        read_params(str(tmp_path))


def test_workdir_at_step_picks_that_step(tmp_path):
    saved = _save_run(tmp_path, steps=(1, 2))
    path = "encoder/layers/0/self_attention/w_v"
    assert not np.array_equal(saved[1][path], saved[2][path])  # two seeds, so the step read is visible
    _, target = _params(Transformer)
    state, report = init_params(target, f"{tmp_path}@1")
    assert report.step == 1
    _assert_bits_equal(_host(state)[path], saved[1][path])
    source, step = read_params(str(tmp_path))
    assert step == 2
    _assert_bits_equal(source[path], saved[2][path])
    with pytest.raises(UserError, match=r"no checkpoint of step 5 in .* \(it has \[1, 2\]\): choose one of those"):
        read_params(str(tmp_path), 5)


def test_parse_source():
    assert parse_source("runs/base") == ("runs/base", None)
    assert parse_source("runs/base@100000") == ("runs/base", 100000)
    assert parse_source("runs/a@b@7") == ("runs/a@b", 7)
    for bad in ("runs/base@", "runs/base@-1", "runs/base@last", "@5"):
        with pytest.raises(UserError, match="the step after '@' must be a checkpoint's step number"):
            parse_source(bad)


def test_parse_source_takes_an_existing_folder_with_an_at_sign(tmp_path):
    folder = tmp_path / "run@v2"
    folder.mkdir()
    assert parse_source(str(folder)) == (str(folder), None)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys):
    saved = _save_run(tmp_path, steps=(1, 2))
    for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**" / "d" / "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    source, step = read_params(str(tmp_path))
    assert step == 1
    _assert_bits_equal(source["src_embed/token_embedding/embedding"], saved[1]["src_embed/token_embedding/embedding"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: skipped checkpoint step 2 in {tmp_path / 'checkpoints'}: it cannot be read (")
    with pytest.raises(UserError, match=r"checkpoint step 2 is unusable: it cannot be read .*choose another step"):
        read_params(str(tmp_path), 2)  # asked for by name: no silent substitute


def test_format_report_by_hand(tmp_path):
    report = InitReport(
        source="runs/wmt", step=3000,
        loaded=("embed/token_embedding/embedding", "encoder/layers/0/self_attention/w_q",
                "encoder/layers/1/self_attention/w_q", "encoder/layers/2/self_attention/w_q",
                "encoder/layers/4/self_attention/w_q"),
        aliased={"embed/token_embedding/embedding": "src_embed/token_embedding/embedding"},
        new=("classifier/bias", "classifier/kernel"),
        skipped={"embed/position_embedding": "shape (256, 16) in source, (512, 16) here"},
        unused=("decoder/layers/0/cross_attention/w_k", "decoder/layers/1/cross_attention/w_k",
                "decoder/final_norm/scale"),
    )
    expected = (
        "Parameters from runs/wmt, checkpoint step 3000:\n"
        "  5 loaded, 2 new (as initialised here), 1 skipped (another shape), 3 of the source unused\n"
        "Loaded:\n"
        "  embed/token_embedding/embedding <- src_embed/token_embedding/embedding\n"
        "  encoder/layers/*/self_attention/w_q  (layers 0-2, 4)\n"
        "New:\n"
        "  classifier/bias\n"
        "  classifier/kernel\n"
        "Skipped:\n"
        "  embed/position_embedding: shape (256, 16) in source, (512, 16) here\n"
        "Unused:\n"
        "  decoder/layers/*/cross_attention/w_k  (layers 0-1)\n"
        "  decoder/final_norm/scale\n"
    )
    assert format_report(report) == expected
    path = write_report(str(tmp_path), report)
    assert path == str(tmp_path / "init_from.txt")
    assert open(path).read() == expected


def test_a_checkpoint_saved_from_a_mesh_is_read_whole_and_loaded_onto_the_targets_shards(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))  # conftest: 8 host devices

    def place(x):  # rows split over the 8 devices where they divide, else a copy on each
        rows = x.ndim and x.shape[0] % 8 == 0
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec("data") if rows else PartitionSpec()))

    _, state, _ = create_train_state(MODEL, TrainConfig(seed=1))
    state = jax.tree.map(place, state)
    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(4, state, {"step": 4})
    checkpoints.close()
    source, _ = read_params(str(tmp_path))
    table = source["src_embed/token_embedding/embedding"]
    assert type(table) is np.ndarray and table.shape == (24, 16)  # the whole matrix, on the host

    _, target = _params(Transformer)
    target = jax.tree.map(place, target)
    loaded, _ = load_matching(target, source)
    leaf = parameter_paths(loaded)["src_embed/token_embedding/embedding"]
    assert leaf.sharding == NamedSharding(mesh, PartitionSpec("data"))
    _assert_bits_equal(np.asarray(leaf), np.asarray(parameter_paths(state.params)["src_embed/token_embedding/embedding"]))
