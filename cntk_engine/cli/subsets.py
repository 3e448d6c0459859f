"""The labelled subsets of a ``.npz`` that ``evaluate`` computes on, and that ``preprocess
--n-train / --n-test`` writes for ``gram`` jobs: one draw, so the two see the same images for the
same ``--n-train``, ``--n-test`` and ``--seed``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets import is_cifar10
from ..solver.targets import check_labels
from .common import GROUPS_TRAIN, CliError, holds_flips, label_vector, open_data, read_member

PAIR_KEYS = ("x_train", "y_train", "x_test", "y_test")
EVALUATE_N = 1000           # evaluate's --n-train and --n-test when not given


@dataclass(frozen=True)
class Drawn:
    """The images and labels drawn from DATA, and where each image is in DATA's arrays: image i
    of the training set is ``train_key[train_at[i]]`` (for the messages that name an image);
    ``groups_train``: the drawn training images' labels of DATA's ``groups_train``, where it
    holds them (None else); ``undrawn``: how many images of the pools the training and the test
    set are drawn from were left out (where 0, every --seed draws the same images into it)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    layout: str
    train_key: str
    train_at: np.ndarray
    test_key: str
    test_at: np.ndarray
    preprocessed: str | None = None      # DATA written by `cntk-engine preprocess`: its method
    groups_train: np.ndarray | None = None
    undrawn: tuple[int, int] = (0, 0)

    def training_image(self, i: int, flipped: bool = False) -> str:
        """Image i of the training set the kernels see (``flipped``: followed by its flips)."""
        n = len(self.train_at)
        if flipped and i >= n:
            return f"the flip of {self.train_key}[{self.train_at[i - n]}]"
        return f"{self.train_key}[{self.train_at[i]}]"

    def test_image(self, i: int) -> str:
        return f"{self.test_key}[{self.test_at[i]}]"


def draw(path: str, n_train: int | None, n_test: int | None, seed: int, *,
         data_format: str = "auto", needs: str = "evaluate needs",
         default_n: int | None = None) -> Drawn:
    """The subsets of DATA as ``evaluate`` documents them: ``n_train`` / ``n_test`` images of
    ``x_train`` / ``x_test`` drawn without replacement by ``np.random.default_rng(seed)`` (each
    kept in DATA's order), or of ``x, y`` shuffled and split; the labels checked, the images
    as DATA holds them (layout not yet read: ``data_format`` only refuses a layout that CIFAR-10's
    python version, also read here (:func:`.common.open_data`), does not have).  ``needs``: the
    command that asks for the keys, in errors (``preprocess``'s subsets are ``evaluate``'s, so
    one command's figures can be checked against the other's).  ``n_train`` or ``n_test`` None:
    all of ``x_train`` / ``x_test`` (the
    draw of ``n = len``: every image, in DATA's order, and the generator's state as for that
    number); a split of ``x, y`` needs both.  ``default_n``: the size the command takes where
    none is typed (evaluate's), said where a size it cannot take may be it."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"DATA {path!r} does not exist")
    if not (p.is_file() or is_cifar10(p)):
        raise CliError(f"DATA {path!r} is neither a file nor a folder")
    check_sizes(n_train, n_test)
    z = open_data(p, data_format, "DATA")
    if not hasattr(z, "files"):
        raise CliError(f"DATA {path!r} is a .npy array; {needs} a .npz archive with keys "
                       "x_train, y_train, x_test, y_test or x, y, or CIFAR-10's python version")
    with z:
        return draw_from(z, path, n_train, n_test, seed, needs=needs, default_n=default_n)


def check_sizes(n_train: int | None, n_test: int | None) -> None:
    """--n-train and --n-test, before any data is read."""
    if n_train is not None and n_train < 2:
        raise CliError(f"--n-train must be at least 2; got {n_train}")
    if n_test is not None and n_test < 1:
        raise CliError(f"--n-test must be at least 1; got {n_test}")


def _default(default_n: int | None, *sizes: int) -> str:
    """Where the sizes may be evaluate's default ``default_n``, not typed: said in a refusal
    of them."""
    if default_n is None or default_n not in sizes:
        return ""
    return " (evaluate's default where not given)" if len(sizes) == 1 else \
        f" ({default_n}: evaluate's default where not given)"


def draw_from(z, path: str, n_train: int | None, n_test: int | None, seed: int, *,
              needs: str = "evaluate needs", default_n: int | None = None) -> Drawn:
    """:func:`draw` from DATA already open as ``z`` (an NpzFile, or :func:`.common.open_data`'s
    arrays); sizes checked by :func:`check_sizes`."""
    rng = np.random.default_rng(seed)
    names = list(z.files)
    if holds_flips(z):              # a draw from it would split images from their flips
        raise CliError(f"DATA {path!r}: its x_train holds its images' flips (preprocess "
                       f"--augment-flips wrote it); {needs} the images without them (the archive "
                       "given to that preprocess; evaluate --augment-flips flips the subset it "
                       "draws)")
    if all(k in names for k in PAIR_KEYS):
        xtr, ytr = _pair(z, "x_train", "y_train", path)
        xte, yte = _pair(z, "x_test", "y_test", path)
        _check_labels(path, ytr, "y_train")     # before the kernels
        _check_labels(path, yte, "y_test", like=ytr)   # labels of two kinds never match
        n_train = len(xtr) if n_train is None else n_train
        n_test = len(xte) if n_test is None else n_test
        for n, avail, what in ((n_train, len(xtr), "--n-train"), (n_test, len(xte), "--n-test")):
            if n > avail:
                raise CliError(f"{what} {n}{_default(default_n, n)} is more than the {avail} images in "
                               f"DATA {path!r}: give {what} {avail} or fewer")
        groups = _groups(z, path, len(xtr)) if GROUPS_TRAIN in names else None
        i = np.sort(rng.choice(len(xtr), n_train, replace=False))
        j = np.sort(rng.choice(len(xte), n_test, replace=False))
        if groups is not None and len(np.unique(groups[i])) < 2:
            raise CliError(f"the {n_train} training images drawn from DATA {path!r} are all in "
                           f"one of its {GROUPS_TRAIN}: leaving that group out would leave nothing "
                           "to fit; use a larger --n-train or another --seed")
        return Drawn(xtr[i], ytr[i], xte[j], yte[j], "x_train/x_test", "x_train", i, "x_test", j,
                     groups_train=None if groups is None else groups[i],
                     undrawn=(len(xtr) - n_train, len(xte) - n_test))
    some = [k for k in PAIR_KEYS if k in names]
    if some:            # not the x / y split beside them: the caller meant a given split
        raise CliError(f"DATA {path!r} holds {', '.join(some)} but not "
                       f"{', '.join(k for k in PAIR_KEYS if k not in names)}; {needs} all "
                       "four keys x_train, y_train, x_test, y_test (or only x, y)")
    if "x" in names and "y" in names:
        if GROUPS_TRAIN in names:     # its images are x_train's, which this DATA does not hold
            raise CliError(f"DATA {path!r} holds x, y and {GROUPS_TRAIN}: {GROUPS_TRAIN} labels "
                           "the images of x_train (the leave-one-out groups), and x is split at "
                           "random; give x_train, y_train, x_test, y_test with it, or leave it out")
        if n_train is None or n_test is None:
            raise CliError(f"DATA {path!r} holds x, y: --n-train and --n-test split it into "
                           "a training and a test set; give both")
        x, y = _pair(z, "x", "y", path)
        _check_labels(path, y, "y")
        if n_train + n_test > len(x):
            raise CliError(f"--n-train {n_train} + --n-test {n_test}{_default(default_n, n_train, n_test)} "
                           f"is more than the {len(x)} images in DATA {path!r}: give smaller ones")
        perm = rng.permutation(len(x))
        i, j = np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])
        left = len(x) - n_train - n_test
        return Drawn(x[i], y[i], x[j], y[j], "x/y split", "x", i, "x", j, undrawn=(left, left))
    raise CliError(f"DATA {path!r} holds arrays {names}; {needs} the keys x_train, "
                   "y_train, x_test, y_test or x, y")


def _groups(z, path: str, n: int) -> np.ndarray:
    """DATA's ``groups_train`` (one group label per image of its ``x_train``, ``n``), checked
    as the solver checks them, as DATA holds them (a subset writes its images' labels)."""
    from ..solver import check_groups
    g = read_member(z, GROUPS_TRAIN, path)
    try:
        check_groups(g, n)
    except ValueError as e:            # its message names "groups"
        raise CliError(f"DATA {path!r}: {GROUPS_TRAIN}, the leave-one-out groups of x_train: "
                       f"{e}") from None
    return g.ravel() if g.ndim == 2 else g


def _check_labels(path, y, what, like=None) -> None:
    try:
        check_labels(y, len(y), what, like=like)
    except ValueError as e:
        raise CliError(f"DATA {path!r}: {e}") from None


def _pair(z, kx, ky, path):
    x, y = read_member(z, kx, path), read_member(z, ky, path)
    if x.ndim not in (3, 4):
        raise CliError(f"DATA {path!r}: {kx} must be images (N, H, W), (N, C, H, W) or (N, H, W, C); "
                       f"got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise CliError(f"DATA {path!r}: {kx} must hold numbers; got dtype {x.dtype}")
    if 0 in x.shape[1:]:
        raise CliError(f"DATA {path!r}: {kx} holds images of shape {x.shape[1:]}, with no pixels")
    if x.dtype.kind == "f":      # here, on the whole array: named by their positions in DATA
        bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
        if bad.any():
            idx = np.nonzero(bad)[0]
            more = len(idx) - 10
            raise CliError(f"DATA {path!r}: {kx} has NaN or Inf pixels in image(s) at index "
                           f"{idx[:10].tolist()}" + (f" and {more} more" if more > 0 else "")
                           + f" (positions in {kx}); all pixels must be finite")
    y = label_vector(y)
    if y.ndim != 1 or len(y) != len(x):
        raise CliError(f"DATA {path!r}: {ky} must be one label per image ({len(x)},); got shape {y.shape}")
    return x, y
