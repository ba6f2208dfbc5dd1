"""Data sources: digits split, npz validation, TFDS via mock_data, fail-fast."""
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from jdcl_jax.data import scenario
from jdcl_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


# ---- digits ---------------------------------------------------------------------------------------

def test_digits_matches_the_reference_split():
  ds = sources.load_source(_cfg(source="digits"))
  assert (len(ds.y_train), len(ds.y_test)) == (1437, 360)
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.uint8
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
  digits = sk_datasets.load_digits()
  _, _, y_train, y_test = model_selection.train_test_split(
      digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.y_test, y_test)
  # DIGITS_ANCHOR.md section 1: train sizes per task; "72 test images per task" is rounded.
  tasks = scenario.task_classes(10, 5)
  assert [len(scenario.task_indices(ds.y_train, t)) for t in tasks] == [288, 288, 290, 288, 283]
  assert [len(scenario.task_indices(ds.y_test, t)) for t in tasks] == [72, 72, 73, 72, 71]


def test_digits_pixel_mapping_and_resize():
  ds = sources.load_source(_cfg(source="digits"))
  values = np.unique(ds.x_train)
  expected = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
  assert set(values.tolist()) <= set(expected.tolist()) and values.max() == 255
  big = sources.load_source(_cfg(source="digits", image_size=16, resize_method="nearest"))
  assert big.x_train.shape == (1437, 16, 16, 1)
  # Nearest 2x upsampling repeats every pixel.
  np.testing.assert_array_equal(big.x_train[:, ::2, ::2], ds.x_train)


def test_unknown_source_is_rejected():
  with pytest.raises(ValueError, match="unknown data source"):
    sources.load_source(_cfg(source="mnist"))


# ---- npz ------------------------------------------------------------------------------------------

def _arrays(**override):
  rs = np.random.RandomState(0)
  a = dict(x_train=rs.randint(0, 256, (12, 6, 6, 3)).astype(np.uint8),
           y_train=np.arange(12) % 3,
           x_test=rs.randint(0, 256, (6, 6, 6, 3)).astype(np.uint8),
           y_test=np.arange(6) % 3)
  a.update(override)
  return {k: v for k, v in a.items() if v is not None}


def _npz(tmp_path, **override) -> ml_collections.ConfigDict:
  path = tmp_path / "user.npz"
  np.savez(path, **_arrays(**override))
  return _cfg(source="npz", npz_path=str(path))


def test_npz_happy_path_and_hw_images(tmp_path):
  ds = sources.load_source(_npz(tmp_path))
  assert ds.x_train.shape == (12, 6, 6, 3) and ds.num_classes == 3 and ds.name == "user"
  gray = _arrays()
  ds = sources.load_source(_npz(tmp_path, x_train=gray["x_train"][..., 0],
                                x_test=gray["x_test"][..., 0]))
  assert ds.x_train.shape == (12, 6, 6, 1) and ds.y_test.dtype == np.int32


@pytest.mark.parametrize("override, message", [
    (dict(y_test=None), r"missing key\(s\) \['y_test'\]"),
    (dict(x_train=np.zeros((12, 6, 6, 3), np.float32)), "x_train has dtype float32"),
    (dict(y_train=np.arange(11) % 3), "x_train has 12 images but y_train has 11"),
    (dict(x_test=np.zeros((6, 5, 5, 3), np.uint8)), "inconsistent image shapes"),
    (dict(y_test=np.array([0, 1, 2, 0, 1, -1])), "negative labels"),
    (dict(y_train=np.arange(12) % 4 * (np.arange(12) % 4 != 1)), r"class\(es\) \[1\]"),
    (dict(x_test=np.zeros((0, 6, 6, 3), np.uint8), y_test=np.zeros(0, int)), "test split is empty"),
    (dict(x_train=np.zeros((12, 6, 6, 2), np.uint8)), "C in \\(1, 3\\)"),
    (dict(y_train=np.arange(12) % 3 + 0.0), "1-D integer array"),
])
def test_npz_validation_names_the_problem(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    sources.load_source(_npz(tmp_path, **override))


def test_npz_labels_out_of_range_for_declared_classes(tmp_path):
  cfg = _npz(tmp_path)
  cfg.num_classes = 2
  with pytest.raises(ValueError, match="label 2 is out of range for num_classes=2"):
    sources.load_source(cfg)


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="npz file not found"):
    sources.load_source(_cfg(source="npz", npz_path=str(tmp_path / "nope.npz")))


# ---- TFDS (mocked: never a real download) --------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_cifar_through_mock_data(tmp_path, name, classes):
  cfg = _cfg(source="tfds", tfds_name=name, data_dir=str(tmp_path), image_size=32)
  with tfds.testing.mock_data(num_examples=12):
    ds = sources.load_source(cfg)
  assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (12, 32, 32, 3)
  assert ds.num_classes == classes and ds.name == name
  assert ds.y_train.dtype == np.int32 and 0 <= ds.y_train.min() and ds.y_train.max() < classes


def test_tfds_imagenet100_preset_restricts_and_relabels(tmp_path):
  # Mocked imagenet2012 has real WordNet label names and random image sizes.
  with tfds.testing.mock_data(num_examples=40):
    source = tfds.data_source("imagenet2012", split="train", data_dir=str(tmp_path),
                              download=False, builder_kwargs={"file_format": "array_record"})
    names = source.dataset_info.features["label"].names
    present = sorted({names[int(source[i]["label"])] for i in range(len(source))})
    wanted = present[:3]
    class_file = tmp_path / "classes.txt"
    class_file.write_text("# three mocked classes\n" + "\n".join(reversed(wanted)) + "\n")
    cfg = _cfg(source="tfds", tfds_name="imagenet100", data_dir=str(tmp_path),
               image_size=16, class_list=str(class_file), cache_dir=str(tmp_path / "cache"))
    ds = sources.load_source(cfg)
    expected = [wanted.index(names[int(source[i]["label"])])
                for i in range(len(source)) if names[int(source[i]["label"])] in wanted]
  assert ds.class_names == tuple(wanted) and ds.num_classes == 3
  np.testing.assert_array_equal(ds.y_train, expected)
  assert ds.x_train.shape == (len(expected), 16, 16, 3)
  cached = sources.load_source(cfg)  # outside the mock: served from cache_dir
  np.testing.assert_array_equal(cached.x_train, ds.x_train)
  assert cached.class_names == ds.class_names


def test_imagenet100_preset_defaults():
  spec = sources._tfds_spec(_cfg(tfds_name="imagenet100", image_size=64))  # pylint: disable=protected-access
  assert (spec.builder, spec.resize, spec.test_split) == ("imagenet2012", 76, "validation")
  assert spec.class_list == sources.IMAGENET100_CLASS_LIST


def test_imagenet100_class_list_is_valid():
  ids = sources.read_class_list("configs/imagenet100_classes.txt")
  assert len(ids) == 100 == len(set(ids)) and ids[0] == "n02869837"
  labels_file = pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
  imagenet = set(labels_file.read_text().split())
  assert len(imagenet) == 1000 and set(ids) <= imagenet


def test_preprocess_resize_then_centre_crop():
  img = np.random.RandomState(0).randint(0, 256, (50, 30, 3)).astype(np.uint8)
  out = sources.preprocess_image(img, 64, 76)
  assert out.shape == (64, 64, 3)
  from PIL import Image  # the reference: Resize((76, 76)) then CenterCrop(64)
  ref = np.asarray(Image.fromarray(img).resize((76, 76), Image.BILINEAR))[6:70, 6:70]
  np.testing.assert_array_equal(out, ref)


_MISSING_SCRIPT = textwrap.dedent("""
    import sys, time
    from jdcl_jax.data import sources
    t0 = time.time()
    try:
      sources.load_source({"source": "tfds", "tfds_name": sys.argv[1], "data_dir": sys.argv[2],
                           "image_size": 32})
    except sources.DatasetNotPreparedError as e:
      print(f"ELAPSED {time.time() - t0:.2f}")
      print(e)
      sys.exit(0)
    sys.exit(3)
""")


@pytest.mark.parametrize("name, hint", [("cifar10", "tfds build cifar10 --file_format=array_record"),
                                        ("imagenet100", "--manual_dir=MANUAL_DIR")])
def test_missing_tfds_data_fails_fast(tmp_path, name, hint):
  # A subprocess with a hard timeout: if anything ever reached a real download,
  # TFDS would retry for minutes and ignore signals; the test must not hang.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", _MISSING_SCRIPT, name, str(tmp_path)],
                        capture_output=True, text=True, timeout=90, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  elapsed = float(proc.stdout.split()[1])
  assert elapsed < 10, f"took {elapsed}s (total {time.time() - t0:.1f}s)"
  assert hint in proc.stdout and str(tmp_path) in proc.stdout
