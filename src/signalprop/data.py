"""Built-in data: nothing is downloaded at run time.

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 x 64, 10 classes), shipped with sklearn.
- ``mnist1d``: MNIST-1D (Greydanus 2020), regenerated offline by the ``mnist1d`` package
  (40-dimensional signals, 10 classes, 4000 train / 1000 test).
- ``spiral``: K interleaved 2-D spirals (synthetic, any size).
- ``teacher``: regression targets from a random teacher MLP (synthetic).
- :func:`load_idx`: the real-file loader for MNIST-style IDX files (tested on files the tests make).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from signalprop._registry import Registry


@dataclass
class Dataset:
    """A train/test split held as tensors.

    Attributes:
        x_train: [N, D] float32 features.
        y_train: [N] int64 labels (classification) or [N, O] float32 targets (regression).
        x_test, y_test: the held-out split, same layout.
        name: Identifier.
        num_classes: Number of classes, or 0 for regression.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    num_classes: int

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def out_features(self) -> int:
        return self.num_classes if self.num_classes else int(self.y_train.shape[1])

    def to(self, device: str | torch.device) -> Dataset:
        """Move all tensors to ``device``."""
        return Dataset(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.name,
            self.num_classes,
        )

    def loader(
        self, batch_size: int = 64, shuffle: bool = True, seed: int = 0
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over the training split."""
        ds = torch.utils.data.TensorDataset(self.x_train, self.y_train)
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = idx[:n_test], idx[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _standardize(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # statistics from the training split only; constant features (e.g. digit border pixels)
    # get std 1 instead of a division by zero
    mu = xtr.mean(0)
    sd = xtr.std(0)
    sd = np.where(sd < 1e-8, 1.0, sd)
    return (xtr - mu) / sd, (xte - mu) / sd


def _to_ds(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, name: str, k: int
) -> Dataset:
    ydt = torch.long if k else torch.float32
    return Dataset(
        torch.as_tensor(xtr, dtype=torch.float32),
        torch.as_tensor(ytr, dtype=ydt),
        torch.as_tensor(xte, dtype=torch.float32),
        torch.as_tensor(yte, dtype=ydt),
        name,
        k,
    )


DATASETS: Registry = Registry("dataset")


@DATASETS.register("digits", test_fraction=0.2, seed=0, standardize=True)
def digits(test_fraction: float = 0.2, seed: int = 0, standardize: bool = True) -> Dataset:
    """scikit-learn digits (1797 x 64, pixel values 0..16), split and standardised per feature.

    Args:
        test_fraction: Fraction held out for testing.
        seed: Split seed.
        standardize: Z-score each pixel with training statistics; otherwise scale to [0, 1].
    """
    from signalprop._optional import require

    d = require("sklearn.datasets", "lab", "the digits data set").load_digits()
    x = d.data.astype(np.float64)
    xtr, ytr, xte, yte = _split(x, d.target.astype(np.int64), test_fraction, seed)
    if standardize:
        xtr, xte = _standardize(xtr, xte)
    else:
        xtr, xte = xtr / 16.0, xte / 16.0
    return _to_ds(xtr, ytr, xte, yte, "digits", 10)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int) -> tuple[np.ndarray, ...]:
    # generating takes ~2 s; cache per process. The package only writes to disk when asked to.
    from signalprop._optional import require

    m1d = require("mnist1d.data", "lab", "the mnist1d data set")
    get_dataset_args, make_dataset = m1d.get_dataset_args, m1d.make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return (
        np.asarray(d["x"], dtype=np.float64),
        np.asarray(d["y"], dtype=np.int64),
        np.asarray(d["x_test"], dtype=np.float64),
        np.asarray(d["y_test"], dtype=np.int64),
    )


@DATASETS.register("mnist1d", seed=42, standardize=True)
def mnist1d(seed: int = 42, standardize: bool = True) -> Dataset:
    """MNIST-1D (Greydanus 2020) regenerated offline: 4000 train / 1000 test, 40 features.

    Args:
        seed: The generator seed (42 is the package's default, i.e. the published data set).
        standardize: Z-score each feature with training statistics.
    """
    xtr, ytr, xte, yte = _mnist1d_arrays(seed)
    if standardize:
        xtr, xte = _standardize(xtr, xte)
    return _to_ds(xtr, ytr, xte, yte, "mnist1d", 10)


@DATASETS.register("spiral", n=2000, classes=3, noise=0.2, seed=0, test_fraction=0.25)
def spiral(
    n: int = 2000, classes: int = 3, noise: float = 0.2, seed: int = 0, test_fraction: float = 0.25
) -> Dataset:
    """``classes`` interleaved 2-D spiral arms, ``n`` points in total."""
    rng = np.random.default_rng(seed)
    per = n // classes
    xs, ys = [], []
    for k in range(classes):
        r = np.linspace(0.05, 1.0, per)
        t = np.linspace(k * 4.0, (k + 1) * 4.0, per) + rng.normal(0, noise, per)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], 1))
        ys.append(np.full(per, k))
    x = np.concatenate(xs)
    y = np.concatenate(ys).astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    xtr, xte = _standardize(xtr, xte)
    return _to_ds(xtr, ytr, xte, yte, "spiral", classes)


@DATASETS.register(
    "teacher", n=2000, in_features=20, out_features=1, width=64, depth=2, seed=0, noise=0.0
)
def teacher(
    n: int = 2000,
    in_features: int = 20,
    out_features: int = 1,
    width: int = 64,
    depth: int = 2,
    seed: int = 0,
    noise: float = 0.0,
) -> Dataset:
    """Regression on the outputs of a random tanh teacher MLP (Gaussian inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    h = x
    dims = [in_features] + [width] * depth + [out_features]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = torch.randn(a, b, generator=g) / a**0.5
        h = h @ w
        if i < len(dims) - 2:
            h = torch.tanh(h)
    y = h + noise * torch.randn(h.shape, generator=g)
    y = (y - y.mean(0)) / y.std(0).clamp_min(1e-8)
    n_test = n // 4
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], "teacher", 0)


def load_dataset(name: str, **kwargs: object) -> Dataset:
    """Build a registered data set by name (``ValueError`` listing the valid names otherwise)."""
    return DATASETS.build(name, **kwargs)


# --- IDX files (MNIST's format) ---------------------------------------------------------------
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), as used by MNIST.

    Format: 2 zero bytes, a type code, the number of dimensions n, n big-endian uint32 sizes,
    then the data in C order (LeCun et al., http://yann.lecun.com/exdb/mnist/).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on a malformed header or a size that does not match the header.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no IDX file at {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dt = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dt.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data has {len(raw) - header} bytes, header says {expected}"
        )
    return np.frombuffer(raw, dtype=dt, offset=header).reshape(shape).astype(dt.newbyteorder("="))
