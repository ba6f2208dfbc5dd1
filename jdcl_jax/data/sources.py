"""Dataset sources: sklearn digits, TFDS (CIFAR-10/100, ImageNet-100) and npz.

Every source returns an in-memory `ArrayDataset` (uint8 NHWC images, int32
labels). `load_source(config.data)` picks the source through the explicit
`SOURCES` dict (no registration by import side effect).

Fields of `config.data` read here (all optional except `source`):
  source         "digits" | "tfds" | "npz".
  name           display name of the dataset (default: derived from the source).
  image_size     final square side; None keeps the native size.
  resize         side of an aspect-changing resize done *before* a centre crop
                 to image_size (ImageNet-100: 76 -> crop 64, as the original);
                 None means "resize straight to image_size" when sizes differ.
  resize_method  "bilinear" (PIL, antialiased like torchvision) | "nearest".
  tfds_name      TFDS builder name: "cifar10", "cifar100", "imagenet2012".
  data_dir       TFDS data dir; None uses TFDS's default (honours TFDS_DATA_DIR).
  train_split    TFDS split for training (default "train").
  test_split     TFDS split for testing (default "validation" for imagenet2012,
                 else "test").
  image_key, label_key  TFDS feature keys (default "image", "label"; CIFAR-100's
                 "label" is the fine label).
  class_list     file of WordNet IDs to keep (ImageNet-100); relative paths are
                 tried against the working dir, then the repository root.
  cache_dir      if set, TFDS results are cached there as .npz (decoding
                 ImageNet once takes long).
  npz_path       npz file with x_train, y_train, x_test, y_test.
  num_classes    npz only: expected number of classes (None: max label + 1).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import pathlib
from typing import Any, Callable, Iterable, Optional

import numpy as np
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGENET100_CLASS_LIST = str(REPO_ROOT / "configs" / "imagenet100_classes.txt")
_READ_CHUNK = 1024


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not on disk in array_record format (we never download)."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A whole dataset in host memory: uint8 NHWC images, int32 labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    for split in ("train", "test"):
      x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
      if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"x_{split} must be uint8 NHWC, got {x.dtype} {x.shape}")
      if y.dtype != np.int32 or y.shape != (x.shape[0],):
        raise ValueError(f"y_{split} must be int32 of shape ({x.shape[0]},), "
                         f"got {y.dtype} {y.shape}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads an optional field from a ConfigDict or dict (None means default)."""
  value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
  return default if value is None else value


# ----------------------------------------------------------------------------
# Shared preprocessing (host side, PIL: same resampling as torchvision on PIL).

def preprocess_image(img_HWC: np.ndarray, image_size: Optional[int],
                     resize: Optional[int] = None,
                     method: str = "bilinear") -> np.ndarray:
  """Resizes (aspect-changing) to `resize` then centre-crops to `image_size`."""
  if image_size is None:
    return img_HWC
  resize = resize or image_size
  if resize < image_size:
    raise ValueError(f"resize={resize} must be >= image_size={image_size}")
  h, w, c = img_HWC.shape
  if (h, w) != (resize, resize):
    resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[method]
    pil = Image.fromarray(img_HWC[..., 0] if c == 1 else img_HWC)
    img_HWC = np.asarray(pil.resize((resize, resize), resample))
    img_HWC = img_HWC.reshape(resize, resize, c)
  # torchvision CenterCrop: top = round((H - crop) / 2).
  top = int(round((resize - image_size) / 2.0))
  return img_HWC[top:top + image_size, top:top + image_size]


def _preprocess_all(images: Iterable[np.ndarray], cfg: Any) -> np.ndarray:
  size, resize = _get(cfg, "image_size"), _get(cfg, "resize")
  method = _get(cfg, "resize_method", "bilinear")
  return np.stack([preprocess_image(im, size, resize, method) for im in images])


# ----------------------------------------------------------------------------
# digits: the embedded, offline default.

def load_digits(cfg: Any) -> ArrayDataset:
  """sklearn digits (1797 real 8x8 images), split 1437/360 like the anchor.

  Pixels 0..16 become uint8 round(v * 255 / 16), so x/255*2-1 matches the
  anchor's v/16*2-1 up to 0.5/255. The split is DIGITS_ANCHOR.md section 1:
  train_test_split(test_size=0.2, stratify=y, random_state=0), kept fixed so
  numbers stay comparable with the reference.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  idx_train, idx_test = model_selection.train_test_split(
      np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
  return ArrayDataset(
      x_train=_preprocess_all(x[idx_train], cfg), y_train=y[idx_train],
      x_test=_preprocess_all(x[idx_test], cfg), y_test=y[idx_test],
      num_classes=10, name=_get(cfg, "name", "digits"),
      class_names=tuple(str(i) for i in range(10)))


# ----------------------------------------------------------------------------
# npz: user-supplied arrays, validated with errors that name the problem.

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _check_split(x: np.ndarray, y: np.ndarray, split: str) -> np.ndarray:
  if x.dtype != np.uint8:
    raise ValueError(f"x_{split} has dtype {x.dtype}; expected uint8 images "
                     "in [0, 255] (e.g. np.round(x * 255).astype(np.uint8))")
  if x.ndim == 3:
    x = x[..., None]  # HW -> HW1
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"x_{split} has shape {x.shape}; expected N x H x W or "
                     "N x H x W x C with C in (1, 3)")
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y_{split} must be a 1-D integer array, got {y.dtype} "
                     f"of shape {y.shape}")
  if len(x) != len(y):
    raise ValueError(f"x_{split} has {len(x)} images but y_{split} has "
                     f"{len(y)} labels")
  if len(x) == 0:
    raise ValueError(f"the {split} split is empty")
  if y.min() < 0:
    raise ValueError(f"y_{split} has negative labels (min {y.min()})")
  return x


def load_npz(cfg: Any) -> ArrayDataset:
  """User file with x_train, y_train, x_test, y_test (uint8, HW or HWC)."""
  path = _get(cfg, "npz_path")
  if not path:
    raise ValueError("config.data.npz_path must be set for source='npz'")
  if not os.path.exists(path):
    raise FileNotFoundError(f"npz file not found: {path}")
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in _NPZ_KEYS if k not in f.files]
    if missing:
      raise ValueError(f"{path} is missing key(s) {missing}; expected "
                       f"{list(_NPZ_KEYS)}, found {sorted(f.files)}")
    arrays = {k: f[k] for k in _NPZ_KEYS}
  x_train = _check_split(arrays["x_train"], arrays["y_train"], "train")
  x_test = _check_split(arrays["x_test"], arrays["y_test"], "test")
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f"inconsistent image shapes: train {x_train.shape[1:]} vs "
                     f"test {x_test.shape[1:]}")
  y_train, y_test = arrays["y_train"], arrays["y_test"]
  max_label = int(max(y_train.max(), y_test.max()))
  num_classes = int(_get(cfg, "num_classes", max_label + 1))
  if max_label >= num_classes:
    raise ValueError(f"label {max_label} is out of range for num_classes="
                     f"{num_classes}")
  empty = sorted(set(range(num_classes)) - set(np.unique(y_train).tolist()))
  if empty:
    raise ValueError(f"class(es) {empty} have no training examples")
  x_train, x_test = _preprocess_all(x_train, cfg), _preprocess_all(x_test, cfg)
  if x_train.shape[1] != x_train.shape[2]:
    raise ValueError(f"images must be square, got {x_train.shape[1:3]}; set "
                     "config.data.image_size to resize them")
  return ArrayDataset(x_train, y_train.astype(np.int32), x_test,
                      y_test.astype(np.int32), num_classes,
                      _get(cfg, "name", pathlib.Path(path).stem))


# ----------------------------------------------------------------------------
# TFDS: read prepared array_record data into memory; never download.

def read_class_list(path: str) -> list[str]:
  """WordNet IDs of a class-list file ('#' comments and blank lines skipped)."""
  candidates = [pathlib.Path(path), REPO_ROOT / path]
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise FileNotFoundError(f"class list not found: {path}")
  ids = [ln.strip() for ln in found.read_text().splitlines()]
  ids = [i for i in ids if i and not i.startswith("#")]
  if not ids or len(set(ids)) != len(ids):
    raise ValueError(f"class list {found} is empty or has duplicate entries")
  return ids


def _prepare_command(tfds_name: str, data_dir: Optional[str]) -> str:
  root = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  build = (f"tfds build {tfds_name} --file_format=array_record "
           f"--data_dir={root}")
  if tfds_name == "imagenet2012":
    return ("ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar (from image-net.org) in MANUAL_DIR, then run\n"
            f"  pip install tensorflow-cpu && {build} --manual_dir=MANUAL_DIR")
  return f"Prepare it once (needs internet and TF) with:\n  pip install tensorflow-cpu && {build}"


def _open_split(tfds_name: str, split: str, data_dir: Optional[str],
                skip_image_decoding: bool, image_key: str) -> Any:
  """tfds.data_source with download=False; clear errors instead of retries."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = dict(split=split, data_dir=data_dir, download=False,
                # Pitfall 5: without this TFDS assumes tfrecord and fails.
                builder_kwargs={"file_format": "array_record"})
  if skip_image_decoding:  # keep JPEG bytes: only decode the kept classes
    kwargs["decoders"] = {image_key: tfds.decode.SkipDecoding()}
  try:
    return tfds.data_source(tfds_name, **kwargs)
  except KeyError as e:
    builder = tfds.builder(tfds_name, data_dir=data_dir,
                           file_format="array_record")
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          f"TFDS dataset '{tfds_name}' is not prepared under {builder.data_dir} "
          f"(download is disabled). {_prepare_command(tfds_name, data_dir)}"
      ) from e
    raise ValueError(f"split '{split}' not in {tfds_name}: "
                     f"{list(builder.info.splits)}") from e
  except NotImplementedError as e:  # prepared, but as tfrecord
    raise DatasetNotPreparedError(
        f"TFDS dataset '{tfds_name}' exists but not in array_record format. "
        f"{_prepare_command(tfds_name, data_dir)}") from e


def _iter_records(source: Any) -> Iterable[list[dict]]:
  for start in range(0, len(source), _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, len(source))))
    try:
      yield source.__getitems__(keys)  # batched array_record reads
    except TypeError:  # mocked sources (tfds.testing.mock_data) lack it
      yield [source[k] for k in keys]


def _decode(image: Any) -> np.ndarray:
  if isinstance(image, bytes):
    with Image.open(io.BytesIO(image)) as pil:
      return np.asarray(pil.convert("RGB"))
  return np.asarray(image, dtype=np.uint8)


def _read_split(cfg: Any, split: str, keep: Optional[dict[int, int]],
                pool: concurrent.futures.Executor) -> tuple[np.ndarray, np.ndarray]:
  """Streams one split; `keep` maps original -> new labels (None keeps all)."""
  image_key, label_key = _get(cfg, "image_key", "image"), _get(cfg, "label_key", "label")
  source = _open_split(_get(cfg, "tfds_name"), split, _get(cfg, "data_dir"),
                       keep is not None, image_key)
  size, resize = _get(cfg, "image_size"), _get(cfg, "resize")
  method = _get(cfg, "resize_method", "bilinear")
  prep = lambda im: preprocess_image(_decode(im), size, resize, method)
  xs, ys = [], []
  for records in _iter_records(source):
    if keep is not None:
      records = [r for r in records if int(r[label_key]) in keep]
    # Decoding and PIL resizing release the GIL, so threads help here.
    xs.extend(pool.map(prep, [r[image_key] for r in records]))
    ys.extend(int(r[label_key]) if keep is None else keep[int(r[label_key])]
              for r in records)
  if not xs:
    raise ValueError(f"{_get(cfg, 'tfds_name')}:{split} has no examples of the classes kept")
  return np.stack(xs), np.asarray(ys, np.int32)


def _label_names(cfg: Any) -> list[str]:
  source = _open_split(_get(cfg, "tfds_name"), _get(cfg, "train_split", "train"),
                       _get(cfg, "data_dir"), False, _get(cfg, "image_key", "image"))
  return list(source.dataset_info.features[_get(cfg, "label_key", "label")].names)


def _cache_path(cfg: Any, class_ids: Optional[list[str]]) -> Optional[pathlib.Path]:
  cache_dir = _get(cfg, "cache_dir")
  if not cache_dir:
    return None
  key = repr([_get(cfg, k) for k in (
      "tfds_name", "image_size", "resize", "resize_method", "train_split",
      "test_split", "image_key", "label_key")] + [class_ids])
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  return pathlib.Path(cache_dir) / f"{_get(cfg, 'tfds_name')}-{digest}.npz"


def _from_cache(path: pathlib.Path, name: str) -> ArrayDataset:
  with np.load(path, allow_pickle=False) as f:
    names = tuple(str(n) for n in f["class_names"])
    return ArrayDataset(**{k: f[k] for k in _NPZ_KEYS}, num_classes=len(names),
                        name=name, class_names=names)


def _to_cache(path: pathlib.Path, ds: ArrayDataset) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.npz")  # atomic: no half-written cache
  np.savez(tmp, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
           y_test=ds.y_test, class_names=np.asarray(ds.class_names))
  os.replace(tmp, path)


def load_tfds(cfg: Any) -> ArrayDataset:
  """CIFAR-10/100 or ImageNet(-100) from prepared TFDS array_record files."""
  tfds_name = _get(cfg, "tfds_name")
  if not tfds_name:
    raise ValueError("config.data.tfds_name must be set for source='tfds'")
  class_ids = read_class_list(_get(cfg, "class_list")) if _get(cfg, "class_list") else None
  name = _get(cfg, "name", tfds_name)
  cache = _cache_path(cfg, class_ids)
  if cache is not None and cache.is_file():
    return _from_cache(cache, name)
  names = _label_names(cfg)  # fails fast when the data is missing
  keep = None
  if class_ids is not None:
    unknown = sorted(set(class_ids) - set(names))
    if unknown:
      raise ValueError(f"class list entries not in {tfds_name}: {unknown[:5]}")
    # ImageFolder semantics: new label = rank of the class ID in sorted order.
    position = {n: i for i, n in enumerate(names)}
    names = sorted(class_ids)
    keep = {position[n]: new for new, n in enumerate(names)}
  test_split = _get(cfg, "test_split",
                    "validation" if tfds_name == "imagenet2012" else "test")
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    x_train, y_train = _read_split(cfg, _get(cfg, "train_split", "train"), keep, pool)
    x_test, y_test = _read_split(cfg, test_split, keep, pool)
  ds = ArrayDataset(x_train, y_train, x_test, y_test, len(names), name, tuple(names))
  if cache is not None:
    _to_cache(cache, ds)
  return ds


SOURCES: dict[str, Callable[[Any], ArrayDataset]] = {
    "digits": load_digits,
    "tfds": load_tfds,
    "npz": load_npz,
}


def load_source(data_config: Any) -> ArrayDataset:
  """Loads `config.data` through the `SOURCES` registry."""
  source = _get(data_config, "source", "digits")
  if source not in SOURCES:
    raise ValueError(f"unknown data source {source!r}; expected one of {sorted(SOURCES)}")
  return SOURCES[source](data_config)
