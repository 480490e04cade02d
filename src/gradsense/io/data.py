"""Naming data: ``zoo:NAME``, tensor files, CSV, image folders and text, loaded into one :class:`Data` type.

| form | what is read |
| --- | --- |
| ``zoo:NAME`` | a bundled dataset (``split=`` train/test) |
| ``file.npy`` | one array: the inputs (no pickle) |
| ``file.npz``, ``file.safetensors``, ``file.pt`` | inputs and labels by key (``inputs_key=``, ``labels_key=``; by default ``inputs``/``x``/``X`` and ``labels``/``y``/``targets``, or the only tensor); a ``.pt`` file may also hold one tensor or an ``(inputs, labels)`` pair, and is read with ``weights_only=True`` (never unpickled) |
| ``file.csv`` | a header row of feature names, one example per row; ``label_column=`` names the label column |
| ``folder/`` | images (Pillow), one subfolder per class (or images directly inside: no labels); ``input_shape=(C, H, W)`` resizes, ``normalize=(mean, std)`` standardises |
| ``file.txt``, ``file.jsonl`` | text for text models: one example per line; JSONL objects with ``text_key=`` (default ``text``) and ``labels_key=`` (default ``label``) |

Nothing is ever unpickled and nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IMAGE_SUFFIXES", "TENSOR_SUFFIXES", "Data", "load_data", "load_images", "parse_shape"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TENSOR_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")
TEXT_SUFFIXES = (".txt", ".jsonl")
DATA_FORMS = ("'zoo:NAME', a tensor file (.npy/.npz/.safetensors/.pt), a .csv file, an image folder "
              "(one subfolder per class) or text (.txt/.jsonl)")
_INPUT_KEYS = ("inputs", "input", "x", "X", "data", "features")
_LABEL_KEYS = ("labels", "label", "y", "Y", "targets", "target")


class Data(Dataset):
    """Examples loaded from a data spec: inputs (a tensor) or texts, optional labels, and names.

    Indexing like the zoo datasets: ``data[i]`` is one ``(x, y)`` pair (or ``x`` without labels), and a slice,
    list or index tensor gives the batched pair ``(inputs[idx], labels[idx])`` (or ``inputs[idx]``), so
    ``x, y = data[:16]`` works and ``data`` can be passed as ``data=`` to every analysis.

    Attributes:
        inputs: Tensor of inputs, one row per example (``None`` for text that is not tokenized yet).
        labels: Labels (``(N,)`` class indices or float targets), or ``None``.
        texts: The text of each example (text data), else ``None``.
        feature_names: Names of tabular features (CSV header, zoo tabular data), else ``None``.
        classes: Class names indexed by label (image subfolders, string labels, zoo data), else ``None``.
        masks: Ground-truth masks shaped like ``inputs`` (zoo ``block-digits``), else ``None``.
        name: Short name for titles (file name or zoo name).
        source: The spec it was loaded from.
        kind: ``"tensors"``, ``"table"``, ``"images"``, ``"text"`` or ``"zoo"``.
        files: The file of each example (image folders), else ``None``.
    """

    def __init__(
        self,
        inputs: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        texts: Sequence[str] | None = None,
        feature_names: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        masks: Tensor | None = None,
        name: str = "data",
        source: str = "",
        kind: str = "tensors",
        files: Sequence[str] | None = None,
    ) -> None:
        if inputs is None and texts is None:
            raise ValueError("Data needs inputs or texts.")
        n = len(texts) if inputs is None else int(inputs.shape[0]) if inputs.ndim else 0
        for what, other in (("labels", labels), ("texts", texts), ("masks", masks), ("files", files)):
            if other is not None and len(other) != n:
                raise ValueError(f"{source or name}: {n} inputs but {len(other)} {what}.")
        self.inputs, self.labels, self.masks = inputs, labels, masks
        self.texts = None if texts is None else [str(t) for t in texts]
        self.feature_names = None if feature_names is None else [str(f) for f in feature_names]
        self.classes = None if classes is None else [str(c) for c in classes]
        self.files = None if files is None else [str(f) for f in files]
        self.name, self.source, self.kind = name, source, kind

    def __len__(self) -> int:
        return len(self.texts) if self.inputs is None else int(self.inputs.shape[0])

    def __getitem__(self, index: Any) -> Any:
        if self.inputs is None:
            raise TypeError(f"{self.source or self.name} is text: tokenize it with .tokenize(tokenizer) "
                            "for analyses that need tensors, or read .texts.")
        x = self.inputs[index]
        return x if self.labels is None else (x, self.labels[index])

    def __repr__(self) -> str:
        what = f"{len(self)} texts" if self.inputs is None else f"inputs={tuple(self.inputs.shape)} {self.inputs.dtype}"
        lab = "" if self.labels is None else f", labels={tuple(self.labels.shape)}"
        return f"Data({self.source or self.name!r}, {what}{lab})"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension); ``()`` for untokenized text."""
        return () if self.inputs is None else tuple(self.inputs.shape[1:])

    def take(self, n: int | None) -> Data:
        """The first ``n`` examples (all when ``n`` is ``None`` or larger than the data)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"the number of examples must be >= 1, got {n}.")
        pick = slice(0, n)
        return Data(
            None if self.inputs is None else self.inputs[pick],
            None if self.labels is None else self.labels[pick],
            texts=None if self.texts is None else self.texts[pick], feature_names=self.feature_names,
            classes=self.classes, masks=None if self.masks is None else self.masks[pick], name=self.name,
            source=self.source, kind=self.kind, files=None if self.files is None else self.files[pick],
        )

    def pair(self) -> Any:
        """``(inputs, labels)``, or ``inputs`` without labels: what analyses take as ``data=``."""
        if self.inputs is None:
            raise TypeError(f"{self.source or self.name} is text; tokenize it first (.tokenize(tokenizer)).")
        return self.inputs if self.labels is None else (self.inputs, self.labels)

    def tokenize(self, tokenizer: Any, *, max_length: int | None = None) -> Data:
        """Token ids of the texts (padded to the longest, truncated to ``max_length``) as ``inputs``.

        Raises:
            TypeError: Not text data, or ``tokenizer`` is not callable.
        """
        if self.texts is None:
            raise TypeError(f"{self.source or self.name} is not text; only text data is tokenized.")
        if not callable(tokenizer):
            raise TypeError("tokenize needs a Hugging Face tokenizer (callable on a list of strings).")
        kwargs: dict[str, Any] = {"padding": True, "truncation": True, "return_tensors": "pt"}
        if max_length is not None:
            kwargs["max_length"] = max_length
        ids = tokenizer(list(self.texts), **kwargs)["input_ids"]
        return Data(ids, self.labels, texts=self.texts, classes=self.classes, name=self.name, source=self.source,
                    kind="text")

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Data:
        """A copy with inputs (and labels) on ``device``; floating-point inputs converted to ``dtype``."""
        inputs = self.inputs
        if inputs is not None:
            inputs = inputs.to(device=device, dtype=dtype if dtype is not None and inputs.is_floating_point() else None)
        labels = None if self.labels is None else self.labels.to(device)
        return Data(inputs, labels, texts=self.texts, feature_names=self.feature_names, classes=self.classes,
                    masks=None if self.masks is None else self.masks.to(device), name=self.name,
                    source=self.source, kind=self.kind, files=self.files)


# ------------------------------------------------------------------------------------------------- parsing
def parse_shape(text: str | Sequence[int] | None, what: str = "input shape") -> tuple[int, ...] | None:
    """``"1,8,8"`` (or ``"1x8x8"``, or a sequence) -> ``(1, 8, 8)``; ``None`` stays ``None``.

    Raises:
        ValueError: Not positive integers.
    """
    if text is None:
        return None
    try:
        # every part must be a number: '3,x,4' or '3,,4' is a typo, not the shape (3, 4)
        parts = [int(s) for s in text.strip().replace("x", ",").split(",")] if isinstance(text, str) \
            else [int(s) for s in text]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be positive integers like 3,32,32; got {text!r}.") from err
    if not parts or any(p < 1 for p in parts):
        raise ValueError(f"{what} must be positive integers like 3,32,32; got {text!r}.")
    return tuple(parts)


def _floats(value: Any, what: str) -> list[float]:
    if isinstance(value, str):
        items: list[Any] = [s for s in value.replace(";", ",").split(",") if s.strip()]
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value)
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be numbers, got {value!r}.") from err
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite numbers, got {value!r}.")
    return out


def _parse_normalize(normalize: Any, channels: int) -> tuple[Tensor, Tensor] | None:
    """``"MEAN,STD"`` / ``"m1,m2,m3;s1,s2,s3"`` / ``(mean, std)`` -> per-channel ``(C, 1, 1)`` tensors."""
    if normalize is None:
        return None
    if isinstance(normalize, str):
        if ";" in normalize:
            mean_s, std_s = normalize.split(";", 1)
            mean, std = _floats(mean_s, "normalize mean"), _floats(std_s, "normalize std")
        else:
            vals = _floats(normalize, "normalize")
            if len(vals) != 2:
                raise ValueError("normalize is MEAN,STD (one value each) or 'm1,m2,m3;s1,s2,s3' (one per channel); "
                                 f"got {normalize!r}.")
            mean, std = vals[:1], vals[1:]
    else:
        try:
            mean_v, std_v = normalize
        except (TypeError, ValueError) as err:
            raise ValueError(f"normalize must be (mean, std), got {normalize!r}.") from err
        mean, std = _floats(mean_v, "normalize mean"), _floats(std_v, "normalize std")
    for what, vals in (("mean", mean), ("std", std)):
        if len(vals) not in (1, channels):
            raise ValueError(f"normalize {what} has {len(vals)} values; give 1 or one per channel ({channels}).")
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize std must be > 0, got {std}.")
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32).reshape(shape).expand(channels, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(shape).expand(channels, 1, 1)
    return m, s


# ------------------------------------------------------------------------------------------------- images
def load_images(paths: Sequence[str | os.PathLike[str]], shape: Sequence[int] | None = None, *,
                invert: bool | None = False, normalize: Any = None) -> Tensor:
    """Load image files as a ``(N, C, H, W)`` float32 batch with values in [0, 1] (then ``normalize``).

    Grayscale for C=1, RGB for C=3; resized with a box filter (anti-aliased) to ``(H, W)``. Without ``shape``
    the first image gives it (channels from its mode). With ``invert=None`` a grayscale image whose border is
    brighter than its centre (a dark digit on white paper) is inverted, to match models trained on bright
    strokes on black (the digits data); ``False`` never inverts.

    Raises:
        FileNotFoundError: A missing file.
        ValueError: A file Pillow cannot read, or a shape that is not (C, H, W) with C in {1, 3}.
    """
    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise ValueError("no image files to load.")
    if shape is None:
        first = Path(paths[0])
        if not first.is_file():
            raise FileNotFoundError(f"image file {first} does not exist.")
        try:
            with Image.open(first) as im:
                shape = (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3, im.height, im.width)
        except UnidentifiedImageError as err:
            raise ValueError(f"{first} is not an image Pillow can read.") from err
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"images load as (C, H, W) with C = 1 or 3; the input shape is {tuple(shape)}. "
                         "Give --input-shape C,H,W.")
    c, h, w = (int(s) for s in shape)
    norm = _parse_normalize(normalize, c)
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist.")
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BOX)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not an image Pillow can read.") from err
        t = torch.from_numpy(arr.copy())
        t = t[None] if c == 1 else t.permute(2, 0, 1)
        if c == 1:
            flip = invert
            if flip is None:
                border = torch.cat([t[0, 0], t[0, -1], t[0, :, 0], t[0, :, -1]]).mean()
                flip = bool(border > t[0, h // 4 : h - h // 4, w // 4 : w - w // 4].mean())
            if flip:
                t = 1.0 - t
        if norm is not None:
            t = (t - norm[0]) / norm[1]
        out.append(t.contiguous())
    return torch.stack(out)


def _image_folder(path: Path, input_shape: Any, normalize: Any, limit: int | None) -> Data:
    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] | None = None
    if subdirs:
        classes = [d.name for d in subdirs]
        for i, d in enumerate(subdirs):
            found = images_in(d)
            files += found
            labels += [i] * len(found)
    else:
        files = images_in(path)
    if not files:
        raise ValueError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}), directly or in "
                         "one subfolder per class.")
    if limit is not None:
        files, labels = files[:limit], labels[:limit]
    x = load_images(files, parse_shape(input_shape), invert=False, normalize=normalize)
    return Data(x, torch.tensor(labels, dtype=torch.long) if classes else None, classes=classes, name=path.name,
                source=str(path), kind="images", files=[str(f) for f in files])


# ------------------------------------------------------------------------------------------------- tensors
def _pick(tensors: dict[str, Any], key: str | None, defaults: Sequence[str], what: str, path: Path,
          option: str, required: bool) -> Any:
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path} has no {what} {key!r}; it holds {sorted(tensors)}.")
        return tensors[key]
    for k in defaults:
        if k in tensors:
            return tensors[k]
    if required:
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ValueError(f"{path} holds {sorted(tensors)}: name the {what} with {option} "
                         f"(default names: {', '.join(defaults)}).")
    return None


def _as_tensor(value: Any, what: str, path: Path) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{path}: {what} is an object array; only numeric arrays are read.")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{path}: {what} is a {type(value).__name__}, expected a tensor/array.")


def _tensor_file(path: Path, inputs_key: str | None, labels_key: str | None) -> Data:
    suffix = path.suffix.lower()
    labels: Any = None
    if suffix == ".npy":
        if inputs_key is not None or labels_key is not None:
            raise ValueError(f"{path}: a .npy file holds one array (the inputs); use .npz or .safetensors "
                             "for inputs and labels by key.")
        try:
            inputs: Any = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path} is not a plain numeric .npy array (pickled objects are not loaded): {err}") from None
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                tensors: dict[str, Any] = {k: npz[k] for k in npz.files}
        except ValueError as err:
            raise ValueError(f"{path} holds pickled objects or is not a .npz archive: {err}") from None
        inputs = _pick(tensors, inputs_key, _INPUT_KEYS, "inputs", path, "inputs_key (--inputs-key)", True)
        labels = _pick(tensors, labels_key, _LABEL_KEYS, "labels", path, "labels_key (--labels-key)", False)
    elif suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = dict(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        inputs = _pick(tensors, inputs_key, _INPUT_KEYS, "inputs", path, "inputs_key (--inputs-key)", True)
        labels = _pick(tensors, labels_key, _LABEL_KEYS, "labels", path, "labels_key (--labels-key)", False)
    else:  # .pt / .pth
        from gradsense.io.weights import read_torch_file

        obj = read_torch_file(path, "data file")
        if isinstance(obj, Tensor):
            inputs = obj
        elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj):
            if inputs_key is not None or labels_key is not None:
                raise ValueError(f"{path} holds an (inputs, labels) pair, not named tensors; drop the key options.")
            inputs, labels = obj
        elif isinstance(obj, dict) and obj:
            tensors = {str(k): v for k, v in obj.items()}
            inputs = _pick(tensors, inputs_key, _INPUT_KEYS, "inputs", path, "inputs_key (--inputs-key)", True)
            labels = _pick(tensors, labels_key, _LABEL_KEYS, "labels", path, "labels_key (--labels-key)", False)
        else:
            raise ValueError(f"{path} holds a {type(obj).__name__}; a data .pt file holds a tensor, an "
                             "(inputs, labels) pair or a dict of tensors.")
    x = _as_tensor(inputs, "the inputs", path)
    y = None if labels is None else _as_tensor(labels, "the labels", path)
    if x.ndim == 0:
        raise ValueError(f"{path}: the inputs are a single number; expected one row per example.")
    if y is not None and y.shape[:1] != x.shape[:1]:
        raise ValueError(f"{path}: {x.shape[0]} inputs but {y.shape[0] if y.ndim else 'a scalar of'} labels.")
    return Data(x, y, name=path.name, source=str(path), kind="tensors")


# ------------------------------------------------------------------------------------------------- CSV
def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _labels_from(values: Sequence[Any], what: str) -> tuple[Tensor, list[str] | None]:
    """Integers -> class indices; other numbers -> float targets; strings -> classes (sorted) and indices."""
    nums = [_number(str(v)) if not isinstance(v, (int, float)) or isinstance(v, bool) else float(v) for v in values]
    if all(n is not None for n in nums):
        if all(float(n).is_integer() for n in nums):  # type: ignore[arg-type]
            return torch.tensor([int(n) for n in nums], dtype=torch.long), None  # type: ignore[arg-type]
        return torch.tensor(nums, dtype=torch.float32), None
    if any(isinstance(v, (dict, list)) for v in values):
        raise ValueError(f"{what}: labels must be numbers or class names.")
    classes = sorted({str(v) for v in values})
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(v)] for v in values], dtype=torch.long), classes


#: CSV header names that usually hold the labels: read as a feature only with a warning
_LABEL_NAMES = {"label", "labels", "target", "targets", "y", "class", "classes", "diagnosis", "outcome", "category"}


def _csv(path: Path, label_column: str | int | None) -> Data:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path} is empty.")
    header_is_data = all(_number(c) is not None for c in rows[0])
    header = [f"column {i}" for i in range(len(rows[0]))] if header_is_data else [c.strip() for c in rows[0]]
    body = rows if header_is_data else rows[1:]
    if not body:
        raise ValueError(f"{path} has a header but no rows.")
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"{path}: row {i + 1 + (not header_is_data)} has {len(r)} cells, the header {len(header)}.")
    label_idx = None
    if label_column is not None:
        if isinstance(label_column, int) or (isinstance(label_column, str) and label_column.lstrip("-").isdigit()
                                             and label_column not in header):
            label_idx = int(label_column)
            if not -len(header) <= label_idx < len(header):
                raise ValueError(f"{path}: label column {label_idx} is out of range (it has {len(header)} columns).")
            label_idx %= len(header)
        elif label_column in header:
            label_idx = header.index(label_column)
        else:
            raise ValueError(f"{path} has no column {label_column!r}; its columns: {header[:20]}"
                             + (" ..." if len(header) > 20 else "") + ".")
    elif not header_is_data:
        likely = [h for h in header if h.strip().lower() in _LABEL_NAMES]
        if likely:
            warnings.warn(f"{path.name}: no label column given, so its column {likely[0]!r} is read as a feature and "
                          f"the data has no labels; if it holds the labels, pass --label-column {likely[0]} "
                          f"(label_column={likely[0]!r}).", UserWarning, stacklevel=3)
    features = [i for i in range(len(header)) if i != label_idx]
    if not features:
        raise ValueError(f"{path}: no feature columns left besides the label column.")
    values = np.empty((len(body), len(features)), dtype=np.float32)
    for r, row in enumerate(body):
        for j, c in enumerate(features):
            cell = row[c].strip()
            num = _number(cell) if cell else None
            if num is None:
                line = r + 1 + (not header_is_data)
                why = "is empty (impute missing values first)" if not cell else f"is {cell!r}, not a number"
                raise ValueError(f"{path}: line {line}, column {header[c]!r} {why}; feature columns must be "
                                 "numeric (name the label column with --label-column).")
            values[r, j] = num
    labels, classes = (None, None) if label_idx is None else _labels_from([row[label_idx].strip() for row in body],
                                                                           str(path))
    return Data(torch.from_numpy(values), labels, feature_names=[header[i] for i in features], classes=classes,
                name=path.name, source=str(path), kind="table")


# ------------------------------------------------------------------------------------------------- text
def _text(path: Path, text_key: str | None, labels_key: str | None) -> Data:
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".txt":
        if labels_key is not None:
            raise ValueError(f"{path}: a .txt file holds one text per line and no labels; use .jsonl for labels.")
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{path} holds no text lines.")
        return Data(texts=texts, name=path.name, source=str(path), kind="text")
    texts, labels = [], []
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({err.msg}).") from None
        if isinstance(obj, str):
            obj = {"text": obj}
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {i + 1} is a {type(obj).__name__}; expected an object with a text field.")
        key = text_key or next((k for k in ("text", "sentence", "content", "prompt") if k in obj), None)
        if key is None or key not in obj:
            raise ValueError(f"{path}: line {i + 1} has no {text_key or 'text'!r} field (fields {sorted(obj)}); "
                             "name it with --text-key.")
        if not isinstance(obj[key], str):
            raise ValueError(f"{path}: line {i + 1}: field {key!r} is not a string.")
        texts.append(obj[key])
        lk = labels_key or next((k for k in ("label", "labels", "y", "target") if k in obj), None)
        labels.append(obj.get(lk) if lk is not None else None)
    if not texts:
        raise ValueError(f"{path} holds no JSON lines.")
    given = [v for v in labels if v is not None]
    if labels_key is not None and len(given) != len(labels):
        raise ValueError(f"{path}: {len(labels) - len(given)} lines lack the label field {labels_key!r}.")
    y, classes = (None, None)
    if given:
        if len(given) != len(labels):
            raise ValueError(f"{path}: some lines have a label and some do not; label every line or none.")
        y, classes = _labels_from(given, str(path))
    return Data(None, y, texts=texts, classes=classes, name=path.name, source=str(path),
                kind="text")


# ------------------------------------------------------------------------------------------------- entry
def load_data(
    spec: str | os.PathLike[str],
    *,
    split: str = "test",
    inputs_key: str | None = None,
    labels_key: str | None = None,
    label_column: str | int | None = None,
    text_key: str | None = None,
    input_shape: str | Sequence[int] | None = None,
    normalize: Any = None,
    limit: int | None = None,
) -> Data:
    """Load data named by ``spec`` (see the module docstring for the forms).

    Args:
        spec: ``zoo:NAME`` (a bare zoo name works when no such file exists), a file or a folder.
        split: ``"train"`` or ``"test"`` (zoo data).
        inputs_key: Name of the inputs in ``.npz``/``.safetensors``/``.pt`` files.
        labels_key: Name of the labels there, or of the label field in JSONL.
        label_column: CSV label column (its header name or index).
        text_key: JSONL text field (default ``text``).
        input_shape: ``(C, H, W)`` (or ``"C,H,W"``) images are resized to (default: the first image's).
        normalize: ``(mean, std)`` (or ``"MEAN,STD"``, ``"m1,m2,m3;s1,s2,s3"``) applied to images in [0, 1].
        limit: Read at most this many examples (images are decoded only up to it).

    Returns:
        A :class:`Data`; tensors keep the dtype they were saved with.

    Raises:
        FileNotFoundError: A missing file or folder.
        ValueError: An unknown form, an option that does not apply to it, missing keys or columns, non-numeric
            values, files holding pickled objects (never unpickled).

    Example:
        >>> import gradsense as gs
        >>> x, y = gs.load_data("zoo:digits")[:16]
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ValueError(f"data spec must be {DATA_FORMS}; got {spec!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}.")
    text = str(spec).strip()
    path = Path(text)
    if text.startswith("zoo:") or (not path.exists() and not path.suffix and "/" not in text and ":" not in text):
        return _zoo(text.removeprefix("zoo:"), split, limit,
                    {"inputs_key": inputs_key, "labels_key": labels_key, "label_column": label_column,
                     "text_key": text_key, "input_shape": input_shape, "normalize": normalize})
    if not path.exists():
        raise FileNotFoundError(f"data {text} does not exist; data is {DATA_FORMS}.")
    suffix = path.suffix.lower()
    form = "images" if path.is_dir() else ("tensors" if suffix in TENSOR_SUFFIXES else "table" if suffix == ".csv"
                                           else "text" if suffix in TEXT_SUFFIXES else None)
    if form is None:
        extra = " (single image files go to `gradsense attribute --input`)" if suffix in IMAGE_SUFFIXES else ""
        raise ValueError(f"data {text}: unknown form {suffix or '(no suffix)'!r}{extra}; data is {DATA_FORMS}.")
    allowed = {"tensors": {"inputs_key", "labels_key"}, "table": {"label_column"},
               "images": {"input_shape", "normalize"}, "text": {"text_key", "labels_key"}}[form]
    given = {"inputs_key": inputs_key, "labels_key": labels_key, "label_column": label_column,
             "text_key": text_key, "input_shape": input_shape, "normalize": normalize}
    _refuse_options({k for k, v in given.items() if v is not None} - allowed, f"{form} data ({text})")
    if form == "images":
        return _image_folder(path, input_shape, normalize, limit)
    if form == "tensors":
        data = _tensor_file(path, inputs_key, labels_key)
    elif form == "table":
        data = _csv(path, label_column)
    else:
        data = _text(path, text_key, labels_key)
    return data.take(limit)


_OPTION_FLAGS = {"inputs_key": "--inputs-key", "labels_key": "--labels-key", "label_column": "--label-column",
                 "text_key": "--text-key", "input_shape": "--input-shape", "normalize": "--normalize"}


def _refuse_options(names: set[str], what: str) -> None:
    if names:
        flags = ", ".join(f"{n}= ({_OPTION_FLAGS[n]})" for n in sorted(names))
        raise ValueError(f"{flags} does not apply to {what}.")


def _zoo(name: str, split: str, limit: int | None, options: dict[str, Any]) -> Data:
    from gradsense import zoo

    _refuse_options({k for k, v in options.items() if v is not None}, f"zoo data ({name})")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    try:
        ds = zoo.dataset(name, split=split)
    except ValueError as err:
        raise ValueError(f"{err}. Data is {DATA_FORMS}.") from None
    data = Data(ds.inputs, ds.labels, feature_names=ds.feature_names, classes=ds.classes, masks=ds.masks,
                name=f"{ds.name} ({split})", source=f"zoo:{ds.name}", kind="zoo")
    return data.take(limit)
