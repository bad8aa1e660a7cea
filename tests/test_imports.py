"""The models, the stages and the conversion import without the data pipeline's libraries (grain,
TFDS), as a host that only runs or benchmarks models may lack them; the package's inference API
is still there, imported on first use."""

import subprocess
import sys

import internvl_jax
from internvl_jax import pretrained, preprocess

from scripts import REPO

DATA_LIBRARIES = ("grain", "tensorflow_datasets")


def test_models_stages_and_conversion_import_without_the_data_libraries():
  code = ("import sys\n"
          "import internvl_jax.models.chat, internvl_jax.models.internvl\n"
          "import internvl_jax.stages.sft, internvl_jax.stages.generative\n"
          "import internvl_jax.convert.pytorch\n"
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({DATA_LIBRARIES})))\n")
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert run.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_api_is_the_inference_modules():
  assert internvl_jax.load_pretrained is pretrained.load_pretrained
  assert internvl_jax.Pretrained is pretrained.Pretrained
  assert internvl_jax.normalize_images is preprocess.normalize_images
  assert not hasattr(internvl_jax, "no_such_name")
