import numpy as np

from transformer.checkpoint import average_states
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
