import jax
import numpy as np

from transformer.run.checkpoint import average_states
from transformer.config import TransformerConfig
from transformer.training import TrainConfig, create_train_state


def test_checkpoint_average_is_the_elementwise_mean():
    model = TransformerConfig.tiny(d_model=16, d_ff=24, h=2, N=1)
    _, a, _ = create_train_state(model, TrainConfig(seed=0))
    _, b, _ = create_train_state(model, TrainConfig(seed=1))
    mean = average_states([a, b])
    leaf_a = np.asarray(a.params["encoder"]["layers"][0]["feed_forward"]["linear_1"]["kernel"][...])
    leaf_b = np.asarray(b.params["encoder"]["layers"][0]["feed_forward"]["linear_1"]["kernel"][...])
    leaf_m = np.asarray(mean.params["encoder"]["layers"][0]["feed_forward"]["linear_1"]["kernel"][...])
    assert not np.allclose(leaf_a, leaf_b)
    np.testing.assert_allclose(leaf_m, (leaf_a + leaf_b) / 2, rtol=1e-6)
    assert mean.rng is b.rng


# -- unusable checkpoints: skipped with one line, set aside, never deleted -------------------------

import glob  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from transformer.run.checkpoint import Checkpoints, NonFiniteState, NoUsableCheckpoint, load_params  # noqa: E402

TREE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.arange(4, dtype=np.int32)}


def _scaled(tree, s):
    return {k: v * s for k, v in tree.items()}


def _data_files(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    assert files, f"no array data files under {step_dir}: Orbax's layout changed"
    return files


def _truncate(step_dir):
    for f in _data_files(step_dir):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _remove_data(step_dir):
    for f in _data_files(step_dir):
        os.remove(f)


DAMAGE = {  # how a checkpoint gets damaged, as seen on disk: Orbax writes <step>/{state,meta}/...
    "data files truncated": (_truncate, "it cannot be read ("),
    "data files removed": (_remove_data, "it cannot be read ("),
    "_METADATA missing": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), "state/_METADATA is missing"),
    "meta missing": (lambda d: shutil.rmtree(os.path.join(d, "meta")), "its meta/ folder is missing"),
    "state missing": (lambda d: shutil.rmtree(os.path.join(d, "state")), "its state/ folder is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_unusable_latest_checkpoint_is_skipped_then_set_aside_and_never_deleted(tmp_path, damage):
    harm, reason = DAMAGE[damage]
    checkpoints = Checkpoints(str(tmp_path), keep=2)
    for s in (1, 2, 3):
        checkpoints.save(s, _scaled(TREE, s), {"step": s})
    assert checkpoints.all_steps() == [2, 3]
    bad = tmp_path / "checkpoints" / "3"
    harm(str(bad))
    checkpoints.close()

    # A reader (translate.py, average_checkpoints.py): skip it with one line, leave it where it is.
    lines = []
    checkpoints = Checkpoints(str(tmp_path), keep=2)
    step, state, meta = checkpoints.restore_newest(TREE, note=lines.append)
    assert (step, meta) == (2, {"step": 2})
    np.testing.assert_array_equal(state["w"], TREE["w"] * 2)
    assert len(lines) == 1 and lines[0].startswith(f"warning: skipped checkpoint step 3 in {tmp_path}/checkpoints: "
                                                   f"{reason}"), lines
    assert bad.is_dir()

    # The run holding the work dir's lock: moved aside, with the reason beside it.
    lines = []
    step, _, _ = checkpoints.restore_newest(TREE, set_aside=True, note=lines.append)
    moved = tmp_path / "skipped_checkpoints" / "3"
    assert step == 2 and not bad.exists() and moved.is_dir()
    assert lines[0].endswith(f"; moved to {moved}")
    assert (moved / "WHY_SKIPPED.txt").read_text().startswith(reason)
    kept = sorted(p.relative_to(moved) for p in moved.rglob("*"))
    # Saving on: the same step again, then enough steps to rotate (keep=2) twice: no crash, and
    # Orbax's rotation never reaches the set-aside checkpoint.
    for s in (3, 4, 5):
        checkpoints.save(s, _scaled(TREE, s), {"step": s})
    assert checkpoints.all_steps() == [4, 5]
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == kept
    checkpoints.close()


def test_a_non_finite_state_is_never_saved_and_a_non_finite_checkpoint_is_skipped(tmp_path):
    import orbax.checkpoint as ocp

    checkpoints = Checkpoints(str(tmp_path), keep=5)
    checkpoints.save(1, TREE, {"step": 1})
    poisoned = {"w": TREE["w"].copy(), "n": TREE["n"]}
    poisoned["w"][1, 2] = np.inf
    with pytest.raises(NonFiniteState, match=r"\['w'\] holds NaN or inf"):
        checkpoints.save(2, poisoned, {"step": 2})
    assert checkpoints.all_steps() == [1] and not (tmp_path / "checkpoints" / "2").exists()
    # One written past the check (an older version of this code): skipped on restore.
    checkpoints.manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(poisoned),
                                                        meta=ocp.args.JsonSave({"step": 2})))
    checkpoints.manager.wait_until_finished()
    lines = []
    assert checkpoints.restore_newest(TREE, note=lines.append)[0] == 1
    assert lines == [f"warning: skipped checkpoint step 2 in {tmp_path}/checkpoints: ['w'] holds NaN or inf"]
    checkpoints.close()


def test_load_params_averages_the_newest_usable_checkpoints_and_refuses_a_named_unusable_one(tmp_path, capsys):
    model = TransformerConfig.tiny(d_model=8, d_ff=12, h=2, N=1, vocab_size=11)
    states = [create_train_state(model, TrainConfig(seed=s))[1] for s in range(3)]
    checkpoints = Checkpoints(str(tmp_path), keep=5)
    for s, state in enumerate(states, 1):
        checkpoints.save(s, state, {"step": s})
    checkpoints.close()
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "meta")
    averaged, used = load_params(str(tmp_path), states[0], average_last=2)
    assert used == [1, 2]
    leaf = lambda st: np.asarray(st.params["encoder"]["layers"][0]["feed_forward"]["linear_1"]["kernel"][...])  # noqa: E731
    np.testing.assert_allclose(leaf(averaged), (leaf(states[0]) + leaf(states[1])) / 2, rtol=1e-6)
    assert "skipped checkpoint step 3" in capsys.readouterr().err
    with pytest.raises(NoUsableCheckpoint, match="checkpoint step 3 is unusable: its meta/ folder is missing"):
        load_params(str(tmp_path), states[0], step=3)
    assert (tmp_path / "checkpoints" / "3").is_dir()  # readers never move or delete


def test_a_models_parameters_load_from_a_checkpoint_whose_train_state_has_another_layout(tmp_path, capsys):
    from transformer.run.checkpoint import load_model_params

    model = TransformerConfig.tiny(d_model=8, d_ff=12, h=2, N=1, vocab_size=11)
    states = [create_train_state(model, TrainConfig(seed=s))[1] for s in range(3)]
    checkpoints = Checkpoints(str(tmp_path), keep=5)
    # As an older version of the library saved them: the parameters beside loop and optimizer
    # fields that today's TrainState does not have (so restoring the whole state fails).
    for s, state in enumerate(states[:2], 1):
        checkpoints.save(s, {"params": state.params, "count": np.int32(s), "moments": {"m": np.ones(3, np.float32)}},
                         {"step": s})
    # One whose parameters do not fit the model: skipped, naming the parameter.
    wrong = jax.tree.map(lambda a: a, states[2].params)
    wrong["output_projection"] = {"bias": np.zeros(5, np.float32)}
    wrong["encoder"]["layers"][0]["feed_forward"]["linear_1"]["kernel"] = np.zeros((8, 13), np.float32)
    checkpoints.save(3, {"params": wrong}, {"step": 3})
    checkpoints.close()
    with pytest.raises(NoUsableCheckpoint, match="checkpoint step 2 is unusable: it cannot be read"):
        load_params(str(tmp_path), states[0], step=2)  # the whole state cannot be restored
    capsys.readouterr()
    params, used = load_model_params(str(tmp_path), states[0].params, average_last=2)
    assert used == [1, 2]
    assert "its encoder/layers/0/feed_forward/linear_1/kernel has shape (8, 13), the run's model (8, 12)" in \
        capsys.readouterr().err
    leaf = lambda p: np.asarray(p["encoder"]["layers"][0]["feed_forward"]["linear_1"]["kernel"][...])  # noqa: E731
    np.testing.assert_allclose(leaf(params), (leaf(states[0].params) + leaf(states[1].params)) / 2, rtol=1e-6)
    np.testing.assert_array_equal(leaf(load_model_params(str(tmp_path), states[0].params, step=1)[0]),
                                  leaf(states[0].params))
