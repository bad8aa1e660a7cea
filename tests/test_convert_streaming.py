"""Block-by-block conversion: many small blocks give the same params as whole tensors, and the
Orbax checkpoints it writes restore with Orbax's ordinary calls."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from internvl_jax.convert import keymap
from internvl_jax.convert.intern_vit_layouts import LAYOUTS
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch, orbax_to_pytorch, pytorch_to_orbax
from internvl_jax.models.intern_vit import abstract_params
from internvl_jax.pretrained import Pretrained, load_pretrained
from test_convert import assert_trees_equal, state_dict
from vit_fixtures import LAYERNORM_QKV_BIAS, RMS_QKNORM, random_params

SMALL_BLOCKS = 1000  # bytes: every kernel splits into many row blocks
ORBAX_BLOCKS = 16_000  # each block is one Orbax commit: enough to split the MLP kernels


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blocks_cover_every_tensor_exactly_once(layout):
  abstract = abstract_params(LAYERNORM_QKV_BIAS)
  plans = keymap.plan(LAYOUTS[layout], abstract, SMALL_BLOCKS)
  covered = {path: np.zeros(leaf.shape, np.int32) for path, leaf in keymap.flatten(abstract).items()}
  for tensor in plans:
    rows = 0
    for row_range, index in tensor.blocks:
      covered[tensor.flax][index] += 1
      rows += len(range(*row_range.indices(tensor.torch_shape[0]))) if tensor.torch_shape else 1
    assert rows == (tensor.torch_shape[0] if tensor.torch_shape else 1)
  assert all((count == 1).all() for count in covered.values())
  assert max(len(t.blocks) for t in plans) > 8


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("config", [RMS_QKNORM, LAYERNORM_QKV_BIAS], ids=["rms", "layernorm"])
def test_streaming_conversions_are_bit_exact(tmp_path, layout, config):
  params = random_params(config)
  export_pytorch(config, params, str(tmp_path / "torch"), layout=layout, block_bytes=SMALL_BLOCKS)
  assert_trees_equal(params, import_pytorch(str(tmp_path / "torch"))[1])
  assert_trees_equal(params, import_pytorch(str(tmp_path / "torch"), block_bytes=SMALL_BLOCKS)[1])

  pytorch_to_orbax(str(tmp_path / "torch"), str(tmp_path / "orbax"), block_bytes=ORBAX_BLOCKS)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "orbax" / "params")  # no internvl_jax code
  assert_trees_equal(params, jax.tree.map(np.asarray, restored))
  assert_trees_equal(params, load_pretrained(str(tmp_path / "orbax")).params)

  orbax_to_pytorch(str(tmp_path / "orbax"), str(tmp_path / "back"), layout=layout)
  expected, written = state_dict(tmp_path / "torch"), state_dict(tmp_path / "back")
  assert expected.keys() == written.keys()
  for key in expected:
    np.testing.assert_array_equal(expected[key], written[key])


def test_saved_checkpoints_read_block_by_block(tmp_path):
  params = random_params(RMS_QKNORM)
  Pretrained(RMS_QKNORM, params).save(str(tmp_path / "orbax"))
  orbax_to_pytorch(str(tmp_path / "orbax"), str(tmp_path / "torch"), layout="official",
                   block_bytes=SMALL_BLOCKS)
  assert_trees_equal(params, import_pytorch(str(tmp_path / "torch"))[1])
