"""solver.load_train_test: a training Gram and its test kernel from two stores, loaded only when
they are one model's (same network and readout, the test kernel against the very training
images), on real MNIST digits."""
import os

import numpy as np
import pytest

pytest.importorskip("zarr")

import zarr  # noqa: E402

from cntk_engine import gram, solver  # noqa: E402
from cntk_engine.jobs.store import StoreCorrupt  # noqa: E402

from conftest import load_real  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    x = load_real("mnist_test.npz")["x"][:14, ::4, ::4].astype(np.float64)[:, None] / 255
    return np.ascontiguousarray(x[:8]), np.ascontiguousarray(x[8:])   # 7 x 7 digits: small, real


@pytest.fixture(scope="module")
def stores(tmp_path_factory, digits):
    """Train store (depths 2 and 3, both kernels), its test store (depth 3, ntk) and the same
    test kernel computed the other way round (train x test)."""
    x_train, x_test = digits
    d = tmp_path_factory.mktemp("pair")
    kw = dict(backend="numba", tile=3)
    gram(x_train, depths=[2, 3], kernel="both", out=str(d / "train.zarr"), **kw)
    gram(x_test, x_train, depth=3, out=str(d / "test.zarr"), **kw)
    gram(x_train, x_test, depth=3, out=str(d / "test_t.zarr"), **kw)
    return d


def test_loads_the_matrices_of_one_model(stores, digits):
    x_train, x_test = digits
    K, K_test = solver.load_train_test(stores / "train.zarr", stores / "test.zarr")
    # the one kernel both hold: the train store's depth_3/ntk, the test store's ntk
    np.testing.assert_array_equal(K, solver.load_gram(stores / "train.zarr", "depth_3/ntk"))
    np.testing.assert_array_equal(K_test, solver.load_gram(stores / "test.zarr"))
    assert K.shape == (8, 8) and K_test.shape == (6, 8)
    np.testing.assert_allclose(K_test, gram(x_test, x_train, depth=3, backend="numba"), rtol=1e-6)
    # named explicitly; the result is a named tuple
    both = solver.load_train_test(str(stores / "train.zarr"), str(stores / "test.zarr"),
                                  key="depth_3/ntk")
    np.testing.assert_array_equal(both.K, K)
    np.testing.assert_array_equal(both.K_test, K_test)
    assert both.keys == ("depth_3/ntk", "ntk") and not both.transposed
    # gram(x_train, x_test): its transpose is the test kernel (both orders agree to rounding)
    g = zarr.open_group(str(stores / "train.zarr"), mode="r")
    loaded = solver.load_train_test(g, stores / "test_t.zarr")
    assert loaded.transposed
    K2, K_test2 = loaded
    np.testing.assert_array_equal(K2, K)
    assert K_test2.shape == (6, 8)
    np.testing.assert_allclose(K_test2, K_test, rtol=1e-6)
    # and it goes into the solver as it is
    y = np.arange(8) % 2
    Y, _ = solver.paper_targets(y)
    assert solver.fit_ridge(K, Y, 1e-3).predict(K_test).shape == (6, 2)


def test_stores_of_other_models_are_refused(stores, digits, tmp_path):
    x_train, x_test = digits
    kw = dict(backend="numba", tile=3)
    train = stores / "train.zarr"
    # another readout of the same images
    gram(x_test, x_train, depth=3, pooling="flatten", out=str(tmp_path / "flat.zarr"), **kw)
    with pytest.raises(ValueError, match=r"not kernels of one model: architecture.pooling: the "
                       r"train store has 'gap', the test store 'flatten'"):
        solver.load_train_test(train, tmp_path / "flat.zarr")
    # a depth the train store does not hold
    gram(x_test, x_train, depth=4, out=str(tmp_path / "deep.zarr"), **kw)
    with pytest.raises(ValueError, match=r"hold no kernel of the same depth and kind: the train "
                       r"store holds 'depth_2/nngp' \(depth 2 nngp\), 'depth_2/ntk' \(depth 2 ntk\), "
                       r"'depth_3/nngp' \(depth 3 nngp\), 'depth_3/ntk' \(depth 3 ntk\); the "
                       r"test store 'ntk' \(depth 4 ntk\)"):
        solver.load_train_test(train, tmp_path / "deep.zarr")
    with pytest.raises(ValueError, match=r"holds no ntk kernel at depth 2 \(the train store's "
                       r"'depth_2/ntk'\); it holds 'ntk' \(depth 3 ntk\)"):
        solver.load_train_test(train, stores / "test.zarr", key="depth_2/ntk")
    with pytest.raises(ValueError, match=r"has no kernel array 'ntk'; it holds"):
        solver.load_train_test(train, stores / "test.zarr", key="ntk")
    # the test kernel against other training images: another order, or the pixels scaled
    gram(x_test, x_train[::-1], depth=3, out=str(tmp_path / "order.zarr"), **kw)
    gram(x_test, x_train * 255, depth=3, out=str(tmp_path / "scaled.zarr"), **kw)
    for other in ("order.zarr", "scaled.zarr"):
        with pytest.raises(ValueError, match=r"was not computed against the training images of "
                           r"the train store .*neither of its image sets \(6 and 8 images\)"):
            solver.load_train_test(train, tmp_path / other)
    # the roles: swapped, the same store twice
    with pytest.raises(ValueError, match=r"the train store .* holds a 6 x 8 kernel of two image "
                       r"sets.*\(cntk-engine gram TRAIN, no --x2\)$"):
        solver.load_train_test(stores / "test.zarr", stores / "test_t.zarr")
    with pytest.raises(ValueError, match=r"given the other way round"):
        solver.load_train_test(stores / "test.zarr", train)
    with pytest.raises(ValueError, match=r"the symmetric Gram of one image set \(the training "
                       r"images themselves\)"):
        solver.load_train_test(train, train)
    # not a store; not a path or a group
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("ntk", shape=(6, 8), dtype="float64")
    with pytest.raises(ValueError, match=r"test='.*plain.zarr' is not the root of a cntk_engine "
                       r"Gram store"):
        solver.load_train_test(train, tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match=r"test must be the path or the zarr.Group of a Gram store.*"
                       r"got ndarray"):
        solver.load_train_test(train, np.zeros((6, 8)))
    with pytest.raises(FileNotFoundError, match=r"test: Zarr store .*nowhere.zarr' does not exist"):
        solver.load_train_test(train, tmp_path / "nowhere.zarr")


def test_what_computed_them_may_differ(digits, tmp_path):
    """Another backend or compute dtype: the same kernel to rounding, so one model; so is a
    training Gram computed as gram(x_train, x_train.copy())."""
    x_train, x_test = digits
    gram(x_train, depth=3, backend="numba", dtype="float64", out=str(tmp_path / "a.zarr"))
    gram(x_test, x_train, depth=3, backend="numba", dtype="float32", out=str(tmp_path / "b.zarr"))
    gram(x_test, x_train, depth=3, backend="reference", out=str(tmp_path / "c.zarr"))
    exact = gram(x_test, x_train, depth=3, backend="numba", dtype="float64")
    for other, rtol in (("b.zarr", 1e-5), ("c.zarr", 1e-12)):
        K, K_test = solver.load_train_test(tmp_path / "a.zarr", tmp_path / other)
        np.testing.assert_allclose(K_test, exact, rtol=rtol)
    gram(x_train, x_train.copy(), depth=3, backend="numba", out=str(tmp_path / "twice.zarr"))
    K2, _ = solver.load_train_test(tmp_path / "twice.zarr", tmp_path / "b.zarr")
    np.testing.assert_allclose(K2, K, rtol=1e-5)
    # the training Gram's compute dtype, for the solve's rounding (cntk-engine solve): the
    # store's, and float64 for the reference backend whatever dtype was asked
    assert solver.load_train_test(tmp_path / "twice.zarr", tmp_path / "b.zarr").dtype == "float32"
    assert solver.load_train_test(tmp_path / "a.zarr", tmp_path / "b.zarr").dtype == "float64"
    gram(x_train, depth=3, backend="reference", dtype="float32", out=str(tmp_path / "r.zarr"))
    assert solver.load_train_test(tmp_path / "r.zarr", tmp_path / "b.zarr").dtype == "float64"


@pytest.mark.parametrize("other", [dict(flip=True), dict(fix=True), dict(pooling="lap", lap_window=3),
                                   dict(convention="neural_tangents"), dict(filter_size=5)],
                         ids=lambda d: ",".join(d))
def test_each_field_of_the_network_tells(stores, digits, tmp_path, other):
    x_train, x_test = digits
    gram(x_test, x_train, depth=3, backend="numba", out=str(tmp_path / "o.zarr"), **other)
    field = "pooling" if "pooling" in other else next(iter(other))
    with pytest.raises(ValueError, match=rf"not kernels of one model: .*architecture.{field}: the "
                       "train store has"):
        solver.load_train_test(stores / "train.zarr", tmp_path / "o.zarr")


def test_kernels_and_shapes(stores, digits, tmp_path):
    x_train, x_test = digits
    train = stores / "train.zarr"
    gram(x_test, x_train, depths=[2, 3], kernel="both", backend="numba", out=str(tmp_path / "b.zarr"))
    with pytest.raises(ValueError, match=r"both stores hold the kernels \['depth_2/nngp', "
                       r"'depth_2/ntk', 'depth_3/nngp', 'depth_3/ntk'\] \(as the train store names "
                       r"them\): name one as key="):
        solver.load_train_test(train, tmp_path / "b.zarr")
    K, K_test = solver.load_train_test(train, tmp_path / "b.zarr", key="depth_2/nngp")
    np.testing.assert_array_equal(K_test, solver.load_gram(tmp_path / "b.zarr", "depth_2/nngp"))
    np.testing.assert_array_equal(K, solver.load_gram(train, "depth_2/nngp"))
    # images of another shape: said first
    big = np.ascontiguousarray(np.pad(x_train, ((0, 0), (0, 0), (0, 1), (0, 1))))
    gram(x_test[:, :, :6, :6], x_train[:, :, :6, :6], depth=3, backend="numba",
         out=str(tmp_path / "small.zarr"))
    gram(big, depth=3, backend="numba", out=str(tmp_path / "big.zarr"))
    with pytest.raises(ValueError, match=r"one model: image shape \(C, H, W\): the train store has "
                       r"\(1, 8, 8\), the test store \(1, 6, 6\)"):
        solver.load_train_test(tmp_path / "big.zarr", tmp_path / "small.zarr")


def test_memory_damage_and_unfinished_jobs(stores, tmp_path, monkeypatch):
    import shutil
    train, test = stores / "train.zarr", tmp_path / "test.zarr"
    shutil.copytree(stores / "test.zarr", test)
    # the memory of both matrices, counted before anything is read
    with pytest.raises(solver.GramTooLarge, match=r"train Gram depth_3/ntk 8 x 8 from .* and test "
                       r"kernel ntk 6 x 8 from .*: 896 B as float64.*limit 1000 B: does not fit"):
        solver.load_train_test(train, test, max_memory=1000)
    with pytest.raises(ValueError, match="workspace must be a number >= 0"):
        solver.load_train_test(train, test, workspace=-1)
    with pytest.raises(ValueError, match="device must be one of"):
        solver.load_train_test(train, test, device="tpu")
    # device="cuda": the GPU holds both and K's workspace; the host one matrix and its reading
    from cntk_engine.jobs import store
    with monkeypatch.context() as m:
        m.setattr(store, "available_memory", lambda: 1 << 30)
        m.setattr(store, "available_gpu_memory", lambda: 1407)      # 896 B + 512 B of workspace
        with pytest.raises(solver.GramTooLarge, match=r"1.4 KiB with the solve's workspace \(1 "
                           r"copy\); free GPU memory 1.4 KiB: does not fit"):
            solver.load_train_test(train, test, device="cuda")
        m.setattr(store, "available_gpu_memory", lambda: 1 << 30)
        reading = max(k.nbytes + k.reading() for k in (store._locate(train, "depth_3/ntk", None),
                                                       store._locate(test, "ntk", None)))
        m.setattr(store, "available_memory", lambda: reading - 1)
        with pytest.raises(solver.GramTooLarge, match=r"on the host to read them for the GPU"):
            solver.load_train_test(train, test, device="cuda")
        # on the CPU the test store's reading counts too, where it is the larger
        m.setattr(store, "_read_buffers", lambda arr, spec: 10_000 if arr.shape == (6, 8) else 0)
        m.setattr(store, "available_memory", lambda: 896 + 10_000 - 1)
        with pytest.raises(solver.GramTooLarge, match=r"available RAM"):
            solver.load_train_test(train, test)
        m.setattr(store, "available_memory", lambda: 896 + 10_000)
        solver.load_train_test(train, test)
    # each is verified as load_gram verifies it
    chunk = test / "ntk" / "c" / "1" / "0"
    chunk.write_bytes(os.urandom(chunk.stat().st_size))
    with pytest.raises(StoreCorrupt, match=r"test.zarr' fails verification.*tile \(1, 0\)"):
        solver.load_train_test(train, test)
    zarr.open_group(str(test), mode="r+")["tiles_done"][1, 0] = 0
    with pytest.raises(ValueError, match=r"unfinished: 1 of 6 tiles"):
        solver.load_train_test(train, test)


def test_the_images_tie_labels_to_the_kernels(stores, digits):
    """x_train / x_test: the images the stores were computed from, checked by fingerprint
    (as gram was given them: a copy, or channels-last with data_format, passes; another order
    or the values rounded to float32 not)."""
    x_train, x_test = digits
    train, test = stores / "train.zarr", stores / "test.zarr"
    K, K_test = solver.load_train_test(train, test, x_train=x_train.copy(), x_test=x_test)
    assert K_test.shape == (6, 8)
    # the transposed store: its first image set is the training images, its second the test's
    solver.load_train_test(train, stores / "test_t.zarr", x_train=x_train, x_test=x_test)
    with pytest.raises(ValueError, match=r"x_test \(6 images\) are not the images the test store"):
        solver.load_train_test(train, stores / "test_t.zarr", x_test=x_test[::-1])
    for other in (x_train[::-1], x_train.astype(np.float32)):
        with pytest.raises(ValueError, match=r"x_train \(8 images\) are not the images the train "
                           r"store .*\(8 images there; their sha256 differ"):
            solver.load_train_test(train, test, x_train=other)
    # channels-last copies, said so
    nhwc = x_test.transpose(0, 2, 3, 1)
    solver.load_train_test(train, test, x_test=nhwc, data_format="NHWC")
