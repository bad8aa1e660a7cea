"""The train state pytree and how it is created already sharded over the mesh."""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internvl_jax import optim, sharding


@flax.struct.dataclass
class TrainState:
  """Everything that a checkpoint holds besides the data iterator.

  `step` counts the batches consumed, skipped ones included, so that the data position, the step
  RNG and the checkpoint step agree; the optimizer's own count advances only on applied updates.
  """

  step: jax.Array  # int32 ()
  params: dict  # float32, the whole model
  opt_state: optax.OptState  # for the trainable params only
  rng: jax.Array  # uint32 (2,): raw key data, so checkpoints hold plain arrays
  skipped: jax.Array  # int32 (): non-finite steps so far
  bad_streak: jax.Array  # int32 (): consecutive non-finite steps up to now


def split_seed(seed: int) -> tuple[jax.Array, jax.Array]:
  """(params init key, training key) from the run's seed."""
  root = jax.random.key(seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


class StateFactory:
  """Shapes, shardings and initialization of the state for one stage, optimizer, mesh and
  logical-axis rules."""

  def __init__(self, stage, optimizer_config: optim.OptimizerConfig, mesh: Mesh,
               rules: sharding.Rules):
    self.stage, self.mesh = stage, mesh
    self.tx = optim.make_optimizer(optimizer_config)
    boxed = jax.eval_shape(stage.init, jax.random.key(0))
    self.abstract_params = nn.meta.unbox(boxed)
    self.mask = optim.trainable_mask(optimizer_config, self.abstract_params)
    self.param_shardings = sharding.param_shardings(boxed, mesh, rules)
    trainable = optim.partition(self.abstract_params, self.mask)[0]
    opt_shardings = sharding.opt_state_shardings(
        self.tx, trainable, optim.partition(self.param_shardings, self.mask)[0], mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.shardings = TrainState(
        step=replicated, params=self.param_shardings, opt_state=opt_shardings, rng=replicated,
        skipped=replicated, bad_streak=replicated)
    self._jitted_init = jax.jit(self._init, out_shardings=self.shardings)

  def _init(self, seed) -> TrainState:
    init_key, train_key = split_seed(seed)
    params = nn.meta.unbox(self.stage.init(init_key))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params,
                      opt_state=self.tx.init(optim.partition(params, self.mask)[0]),
                      rng=jax.random.key_data(train_key), skipped=zero, bad_streak=zero)

  def abstract(self) -> TrainState:
    """ShapeDtypeStructs with this mesh's shardings: the target of a restore or a compile."""
    shapes = jax.eval_shape(self._init, 0)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.shardings)

  def init(self, seed: int) -> TrainState:
    """A fresh state, each array created directly in its shards."""
    return self._jitted_init(jnp.int32(seed))
