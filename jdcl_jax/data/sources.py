"""Dataset sources: sklearn digits, TFDS (CIFAR-10/100, ImageNet-100) and npz.

Every source returns an in-memory `ArrayDataset` (uint8 NHWC images, int32
labels). `load_source(config.data)` picks the source through the explicit
`SOURCES` dict (no registration by import side effect).

Fields of `config.data` read here (None or missing = the default shown):
  source         "digits" (default) | "tfds" | "npz".
  name           display name (default: "digits", tfds_name, or the npz stem).
  image_size     final square side; None keeps the native size (a no-op when
                 it equals the native size, e.g. 8 for digits, 32 for CIFAR).
  resize         side of an aspect-changing resize *before* a centre crop to
                 image_size (imagenet100: 76 for 64); None = image_size.
  resize_method  "bilinear" (PIL, antialiased like torchvision) | "nearest".
  tfds_name      "cifar10" | "cifar100" | "imagenet100" (preset, below) | any
                 TFDS image-classification builder.
  data_dir       TFDS data dir; None = TFDS's default (honours TFDS_DATA_DIR).
  train_split    default "train"; test_split: "validation" for ImageNet, else "test".
  image_key, label_key  default "image", "label" (CIFAR-100: fine labels).
  class_list     WordNet-ID file restricting the classes (imagenet100 default:
                 configs/imagenet100_classes.txt); relative paths are tried
                 against the working dir, then the repository root.
  cache_dir      if set, TFDS results are cached there as .npz (reading
                 ImageNet takes long; the original also preprocessed once).
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
  if image_size is None and resize is None:
    return img_HWC
  image_size = image_size or resize
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

# Presets over TFDS builders. "imagenet100" is imagenet2012 restricted to the
# shipped class list, resized to 76x76 (aspect-changing) then centre-cropped to
# 64, as the original's one-off preprocessing (spec 5.2).
TFDS_PRESETS = {
    "imagenet100": dict(builder="imagenet2012", class_list=IMAGENET100_CLASS_LIST,
                        resize_factor=76 / 64),
}


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  builder: str
  data_dir: Optional[str]
  train_split: str
  test_split: str
  image_key: str
  label_key: str
  class_list: Optional[str]
  image_size: Optional[int]
  resize: Optional[int]
  resize_method: str


def _tfds_spec(cfg: Any) -> _TfdsSpec:
  name = _get(cfg, "tfds_name")
  if not name:
    raise ValueError("config.data.tfds_name must be set for source='tfds'")
  preset = TFDS_PRESETS.get(name, {})
  builder = preset.get("builder", name)
  size, resize = _get(cfg, "image_size"), _get(cfg, "resize")
  if resize is None and size and "resize_factor" in preset:
    resize = int(round(size * preset["resize_factor"]))
  return _TfdsSpec(
      builder=builder, data_dir=_get(cfg, "data_dir"),
      train_split=_get(cfg, "train_split", "train"),
      test_split=_get(cfg, "test_split",
                      "validation" if builder == "imagenet2012" else "test"),
      image_key=_get(cfg, "image_key", "image"),
      label_key=_get(cfg, "label_key", "label"),
      class_list=_get(cfg, "class_list", preset.get("class_list")),
      image_size=size, resize=resize,
      resize_method=_get(cfg, "resize_method", "bilinear"))


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


def _prepare_command(builder: str, data_dir: Optional[str]) -> str:
  root = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  build = f"tfds build {builder} --file_format=array_record --data_dir={root}"
  if builder == "imagenet2012":
    return ("ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar (from image-net.org) in MANUAL_DIR, then run\n"
            f"  pip install tensorflow-cpu && {build} --manual_dir=MANUAL_DIR")
  return ("Prepare it once (needs internet; TF only for this step) with:\n"
          f"  pip install tensorflow-cpu && {build}")


def _open_split(spec: _TfdsSpec, split: str, skip_image_decoding: bool) -> Any:
  """tfds.data_source with download=False; clear errors instead of retries."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = dict(split=split, data_dir=spec.data_dir, download=False,
                # Pitfall 5: without this TFDS assumes tfrecord and fails.
                builder_kwargs={"file_format": "array_record"})
  if skip_image_decoding:  # keep JPEG bytes: only decode the kept classes
    kwargs["decoders"] = {spec.image_key: tfds.decode.SkipDecoding()}
  try:
    return tfds.data_source(spec.builder, **kwargs)
  except KeyError as e:  # TFDS's "splits is empty" when nothing is on disk
    builder = tfds.builder(spec.builder, data_dir=spec.data_dir,
                           file_format="array_record")
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          f"TFDS dataset '{spec.builder}' is not prepared under "
          f"{builder.data_dir} (download is disabled). "
          f"{_prepare_command(spec.builder, spec.data_dir)}") from e
    raise ValueError(f"split '{split}' not in {spec.builder}: "
                     f"{list(builder.info.splits)}") from e
  except NotImplementedError as e:  # prepared, but as tfrecord
    raise DatasetNotPreparedError(
        f"TFDS dataset '{spec.builder}' exists but not in array_record format. "
        f"{_prepare_command(spec.builder, spec.data_dir)}") from e


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


def _read_split(spec: _TfdsSpec, split: str, keep: Optional[dict[int, int]],
                pool: concurrent.futures.Executor) -> tuple[np.ndarray, np.ndarray]:
  """Streams one split; `keep` maps original -> new labels (None keeps all)."""
  source = _open_split(spec, split, skip_image_decoding=keep is not None)
  prep = lambda im: preprocess_image(_decode(im), spec.image_size, spec.resize,
                                     spec.resize_method)
  xs, ys = [], []
  for records in _iter_records(source):
    labels = [int(r[spec.label_key]) for r in records]
    if keep is not None:
      records = [r for r, y in zip(records, labels) if y in keep]
      labels = [keep[y] for y in labels if y in keep]
    # Decoding and PIL resizing release the GIL, so threads help here.
    xs.extend(pool.map(prep, [r[spec.image_key] for r in records]))
    ys.extend(labels)
  if not xs:
    raise ValueError(f"{spec.builder}:{split} has no examples of the kept classes")
  return np.stack(xs), np.asarray(ys, np.int32)


def _cache_path(cfg: Any, spec: _TfdsSpec,
                class_ids: Optional[list[str]]) -> Optional[pathlib.Path]:
  cache_dir = _get(cfg, "cache_dir")
  if not cache_dir:
    return None
  key = repr((dataclasses.astuple(dataclasses.replace(spec, data_dir=None)), class_ids))
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
  """CIFAR-10/100, ImageNet-100 (preset) or any image-classification TFDS set."""
  spec = _tfds_spec(cfg)
  class_ids = read_class_list(spec.class_list) if spec.class_list else None
  name = _get(cfg, "name", _get(cfg, "tfds_name"))
  cache = _cache_path(cfg, spec, class_ids)
  if cache is not None and cache.is_file():
    return _from_cache(cache, name)
  train_source = _open_split(spec, spec.train_split, False)  # fails fast if missing
  names = list(train_source.dataset_info.features[spec.label_key].names)
  keep = None
  if class_ids is not None:
    unknown = sorted(set(class_ids) - set(names))
    if unknown:
      raise ValueError(f"class list entries not in {spec.builder}: {unknown[:5]}")
    # ImageFolder semantics: new label = rank of the class ID in sorted order.
    position = {n: i for i, n in enumerate(names)}
    names = sorted(class_ids)
    keep = {position[n]: new for new, n in enumerate(names)}
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    x_train, y_train = _read_split(spec, spec.train_split, keep, pool)
    x_test, y_test = _read_split(spec, spec.test_split, keep, pool)
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
