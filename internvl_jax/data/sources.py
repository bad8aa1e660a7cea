"""TFDS datasets in ArrayRecord format: the record schemas, writing them, and opening them.

Images are stored as their encoded bytes (PNG / JPEG as found), not decoded by TFDS: the
pipelines decode them themselves, so a corrupt image is counted and skipped instead of raising
inside the data source. Writing and reading need no TensorFlow.
"""

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from internvl_jax.data import config as config_lib
from internvl_jax.data import issues

Record = dict[str, Any]
KeyedRecords = Iterable[tuple[str, Record]]


def image_feature() -> tfds.features.FeatureConnector:
  return tfds.features.Tensor(shape=(), dtype=np.object_, doc="encoded image bytes")


def conversations_feature() -> tfds.features.FeatureConnector:
  return tfds.features.Sequence({"from": tfds.features.Text(), "value": tfds.features.Text()})


def pair_features() -> tfds.features.FeaturesDict:
  """Image-caption pairs (stages 1 and 2)."""
  return tfds.features.FeaturesDict({"image": image_feature(), "caption": tfds.features.Text()})


def chat_features() -> tfds.features.FeaturesDict:
  """Conversations (stage 3); "image" is empty for text-only records."""
  return tfds.features.FeaturesDict({
      "image": image_feature(),
      "conversations": conversations_feature(),
  })


def decode_text(value, reason: str) -> str:
  """UTF-8 text of a TFDS Text value (bytes), or `issues.SkipRecord(reason)`."""
  if isinstance(value, str):
    return value
  try:
    return bytes(value).decode("utf-8")
  except UnicodeDecodeError as e:
    raise issues.SkipRecord(reason, str(e)) from e


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes keyed record generators as a TFDS dataset, one generator per split.

  TFDS's own ad-hoc builder needs TensorFlow; this one does not. The dataset is read back by
  name with `tfds.data_source`, which finds it in the data directory.
  """

  def __init__(self, *, name: str, version: str, features: tfds.features.FeaturesDict,
               splits: Mapping[str, Callable[[], KeyedRecords]], config: str | None,
               description: str, data_dir: str):
    self.name = name
    self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
    builder_config = None
    if config:
      builder_config = tfds.core.BuilderConfig(name=config, version=version)
      self.BUILDER_CONFIGS = [builder_config]  # pylint: disable=invalid-name
    self._features = features
    self._splits = splits
    self._description = description
    super().__init__(data_dir=data_dir, config=builder_config, version=version,
                     file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self._description,
                                 features=self._features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(make) for split, make in self._splits.items()}

  def _generate_examples(self, make_records):
    yield from make_records()


def tfds_name(name: str, config: str | None) -> str:
  return f"{name}/{config}" if config else name


def write_dataset(name: str, splits: Mapping[str, Callable[[], KeyedRecords]],
                  features: tfds.features.FeaturesDict, data_dir: str | None = None,
                  config: str | None = None, version: str = "1.0.0",
                  description: str = "") -> str:
  """Writes the splits (each a callable returning (key, record) pairs) and returns the name
  to read it with. Refuses to overwrite an existing dataset of the same name and version."""
  builder = RecordsBuilder(name=name, version=version, features=features, splits=splits,
                           config=config, description=description,
                           data_dir=data_dir or default_data_dir())
  if builder.is_prepared():
    raise FileExistsError(f"{tfds_name(name, config)} {version} already exists in "
                          f"{builder.data_dir}; delete it or choose another name or version.")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tfds_name(name, config)


def is_written(name: str, config: str | None, data_dir: str | None,
               version: str = "1.0.0") -> bool:
  directory = os.path.join(data_dir or default_data_dir(), name, config or "", version)
  return os.path.exists(os.path.join(directory, "dataset_info.json"))


def open_source(source: config_lib.Source):
  """A random-access source (len, __getitem__) over one split; no download is attempted."""
  return tfds.data_source(source.name, split=source.split,
                          data_dir=source.data_dir or default_data_dir(), download=False)
