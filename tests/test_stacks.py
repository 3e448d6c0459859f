"""Pooling stacks and the Myrtle presets: the numba fast path against the float64 4-D reference
and neural-tangents, conventions, properties, every place a user meets them, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

import cntk_engine as ce
from cntk_engine import AvgPool, ConvRelu, serial
from cntk_engine.arch import make_architecture, readout_weights
from conftest import load_real

FIXTURE = Path(__file__).with_name("fixtures") / "nt_stacks.npz"


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


def cifar32(n=3):
    """CIFAR-10 test images (NCHW, [0, 1]) with an all-black window in one and an all-zero one."""
    x = load_real("cifar10_jpeg_small.npz")["x_test"][:n].astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    x[1, :, :12, :12] = 0.0
    return np.concatenate([x, np.zeros((1, 3, 32, 32))])


STACKS = [   # (layers, image size, gram keywords)
    (serial(ConvRelu(), AvgPool(2), ConvRelu()), 4, dict(pooling="gap")),
    (serial([ConvRelu()] * 2, AvgPool(2), ConvRelu(), AvgPool(2)), 8,
     dict(pooling="flatten", convention="neural_tangents", W_std=1.3, b_std=0.4)),
    (serial(ConvRelu(), AvgPool(3, 1), ConvRelu(), AvgPool(2)), 6, dict(pooling="flatten", fix=True)),
    (serial(ConvRelu(), AvgPool(2, 1), ConvRelu(), AvgPool(2), ConvRelu()), 5,
     dict(pooling="gap", fix=True, convention="neural_tangents")),
    (serial(ConvRelu(), AvgPool(2), ConvRelu(), AvgPool(2), AvgPool(2)), 8, dict(pooling="gap")),
    (serial(ConvRelu(), ConvRelu(), AvgPool(2)), 6, dict(pooling="flatten", filter_size=5)),
]


@pytest.mark.parametrize("case", range(len(STACKS)))
def test_numba_matches_reference_on_stacks(case, rng):
    layers, hw, kw = STACKS[case]
    x = rng.standard_normal((4, 2, hw, hw))
    x[3, :, : hw // 2] = 0.0                               # a zero-variance window
    ref = ce.gram(x, architecture=layers, kernel="both", backend="reference", **kw)
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        got = ce.gram(x, architecture=layers, kernel="both", backend="numba", dtype=dtype, **kw)
        for g, r in zip(got, ref):
            assert rel(g, r) <= tol, (dtype, rel(g, r))
    y = rng.standard_normal((3, 2, hw, hw))                # rectangular: x against y
    ref = ce.gram(x, y, architecture=layers, backend="reference", **kw)
    assert rel(ce.gram(x, y, architecture=layers, backend="numba", dtype="float64", **kw), ref) <= 1e-10


@pytest.mark.parametrize("name, kw", [
    ("myrtle5", dict()),
    ("myrtle7", dict(convention="neural_tangents", W_std=1.3, b_std=0.4)),
    ("myrtle10", dict(fix=True)),
])
def test_myrtle_on_real_cifar_matches_reference(name, kw):
    x = cifar32()
    ref = ce.gram(x, architecture=name, kernel="both", backend="reference", **kw)
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        got = ce.gram(x, architecture=name, kernel="both", backend="numba", dtype=dtype, **kw)
        for g, r in zip(got, ref):
            assert rel(g, r) <= tol, (name, dtype, rel(g, r))
            assert np.all(np.isfinite(g))
    if "b_std" not in kw:                                     # no biases: the all-zero image
        assert np.all(ref[0][3] == 0) and np.all(ref[1][3] == 0)


def test_neural_tangents_fixture():
    """Values of neural-tangents 0.6.5's stax (tests/fixtures/make_nt_fixtures.py --stacks)."""
    f = np.load(FIXTURE)
    meta = json.loads(str(f["meta"]))
    assert len(meta["configs"]) >= 10 and {c["name"] for c in meta["configs"]} >= {"myrtle5", "myrtle7", "myrtle10"}
    for i, cfg in enumerate(meta["configs"]):
        x = f[f"images_{cfg['set']}"].transpose(0, 3, 1, 2)
        arch = cfg["name"] or [ConvRelu() if la[0] == "conv" else AvgPool(la[1], la[2]) for la in cfg["layers"]]
        kw = dict(architecture=arch, pooling=cfg["pooling"], convention="neural_tangents",
                  W_std=cfg["W_std"], b_std=cfg["b_std"], kernel="both")
        want = f[f"c{i}_ntk"], f[f"c{i}_nngp"]
        backends = ("numba",) if cfg["name"] else ("numba", "reference")
        for be in backends:
            got = ce.gram(x, backend=be, dtype="float64", **kw)
            for g, w in zip(got, want):
                assert rel(g, w) <= 1e-8, (i, be, rel(g, w))
        got = ce.gram(x, backend="numba", dtype="float32", **kw)
        for g, w in zip(got, want):
            assert rel(g, w) <= 1e-4, (i, "float32", rel(g, w))


def test_myrtle_reference_matches_fixture():
    """The literal 4-D reference against neural-tangents on the Myrtle networks too (one config
    each, the fixture's random images)."""
    f = np.load(FIXTURE)
    meta = json.loads(str(f["meta"]))
    seen = set()
    for i, cfg in enumerate(meta["configs"]):
        if cfg["name"] is None or cfg["name"] in seen or cfg["set"] != "random32":
            continue
        seen.add(cfg["name"])
        x = f[f"images_{cfg['set']}"].transpose(0, 3, 1, 2)[:2]
        got = ce.gram(x, architecture=cfg["name"], pooling=cfg["pooling"], kernel="both",
                      convention="neural_tangents", W_std=cfg["W_std"], b_std=cfg["b_std"],
                      backend="reference")
        for g, w in zip(got, (f[f"c{i}_ntk"][:2, :2], f[f"c{i}_nngp"][:2, :2])):
            assert rel(g, w) <= 1e-8
    assert seen == {"myrtle5", "myrtle7", "myrtle10"}


@pytest.mark.parametrize("fix", [False, True])
def test_conventions_differ_by_known_factor(fix, rng):
    """Without biases: neural_tangents = (2 / C) arora for gap, (2 / (C H_r W_r)) arora for
    flatten at the readout resolution H_r x W_r."""
    x = rng.standard_normal((3, 2, 8, 8))
    for layers, pooling, factor in ((serial(ConvRelu(), AvgPool(2), ConvRelu(), ConvRelu()), "gap", 2 / 2),
                                    (serial(ConvRelu(), AvgPool(2), ConvRelu(), ConvRelu(), AvgPool(2)),
                                     "flatten", 2 / (2 * 2 * 2))):
        a = ce.gram(x, architecture=layers, pooling=pooling, fix=fix, kernel="both", backend="numba",
                    dtype="float64")
        n = ce.gram(x, architecture=layers, pooling=pooling, fix=fix, kernel="both", backend="numba",
                    dtype="float64", convention="neural_tangents")
        for ka, kn in zip(a, n):
            assert rel(kn, factor * ka) <= 1e-12


def test_myrtle_readout_is_gap_of_the_last_stage():
    """Three 2 x 2 pools from 8 x 8 to 1 x 1 then Flatten: the mean over the 8 x 8 stage."""
    arch = make_architecture(architecture="myrtle10")
    r = readout_weights(arch, 32, 32)
    assert r.shape == (8, 8, 8, 8) and np.all(r == 1 / 64 ** 2)
    assert arch.depths == (10,) and arch.n_layers == 9
    stages, trailing, out = arch.plan(32, 32)
    assert [(s.height, s.n_layers) for s in stages] == [(32, 3), (16, 3), (8, 3)]
    assert len(trailing) == 3 and out == (1, 1)


def test_properties_on_real_images():
    x = cifar32(4)[:4]
    ntk, nngp = ce.gram(x, architecture="myrtle5", kernel="both", backend="numba", dtype="float64")
    for k in (ntk, nngp):
        assert k.tobytes() == np.ascontiguousarray(k.T).tobytes()
        assert np.linalg.eigvalsh(k).min() >= -1e-12 * np.abs(k).max()
    flipped = x[..., ::-1].copy()       # the stack is flip-equivariant: flipping both is a no-op
    assert rel(ce.gram(flipped, architecture="myrtle5", backend="numba", dtype="float64"), ntk) <= 1e-12
    # identical images at other indices are self pairs: exactly the diagonal value
    twin = ce.gram(x, x.copy(), architecture="myrtle5", backend="numba")
    assert np.array_equal(np.diag(twin), np.diag(ce.gram(x, architecture="myrtle5", backend="numba")))


def test_stack_diagonals_match_reference(rng):
    from cntk_engine.backends.reference import ReferenceBackend
    from cntk_engine.diag import diag_norms
    for layers, hw, _ in STACKS:
        arch = make_architecture(architecture=layers)
        x = rng.standard_normal((2, 1, hw, hw))
        params = arch.layer_params(1, hw, hw)
        q = diag_norms(x, arch, params)
        assert rel(q, ReferenceBackend(arch, params, np.float64).prepare(x).diag[0]) <= 1e-13


def test_stack_diagonals_are_kept_for_a_repeat(rng, monkeypatch):
    """A pooled stack's diagonals of the same images (bytes, shape) and network are computed
    once (an estimator's predict asks for its training set's at every call), whatever the
    readout or flips: the same values, a copy the caller may change; other images, another
    network, weights or shape, or a set beyond
    MEMO_BYTES are computed; the CNN's (cheap) are not kept."""
    from cntk_engine import diag
    from cntk_engine.estimators import CNTKClassifier
    calls = []
    stack_diag = diag._stack_diag
    monkeypatch.setattr(diag, "_stack_diag", lambda x, a, p: (calls.append(len(x)), stack_diag(x, a, p))[1])
    arch = make_architecture(architecture="myrtle5")
    params = arch.layer_params(3, 32, 32)
    x = rng.standard_normal((3, 3, 32, 32))
    q = diag.diag_norms(x, arch, params)
    q[...] = -1.0                                            # the caller's copy
    again = diag.diag_norms(x.copy(), arch, params)
    assert calls == [3] and again.tobytes() == stack_diag(x, arch, params).tobytes()
    again_bytes = again.tobytes()
    again[...] = -2.0                                        # a hit's copy, the caller's too
    assert diag.diag_norms(x, arch, params).tobytes() == stack_diag(x, arch, params).tobytes()
    diag.diag_norms(x[::-1], arch, params, keep=False)       # asked not to keep: not kept
    diag.diag_norms(x[::-1], arch, params), diag.diag_norms(x[::-1], arch, params)
    assert calls == [3, 3, 3]
    calls.clear()
    calls.append(3)
    y = x.copy()
    y[2, 0, 5, 5] += 1e-12
    diag.diag_norms(y, arch, params)                         # one pixel's last bits differ
    diag.diag_norms(x, make_architecture(architecture="myrtle7"), params)
    diag.diag_norms(x.reshape(1, 9, 32, 32), arch, params)   # the same bytes, another shape
    assert calls == [3, 3, 3, 1]
    for other in (dict(flip=True), dict(pooling="flatten"), dict(pooling="lap", lap_window=4)):
        same = make_architecture(architecture="myrtle5", **other)   # the readout: the same q
        assert diag.diag_norms(x, same, same.layer_params(3, 32, 32)).tobytes() == again_bytes
    wider = make_architecture(architecture="myrtle5", convention="neural_tangents", W_std=1.5)
    diag.diag_norms(x, wider, wider.layer_params(3, 32, 32))
    assert calls == [3, 3, 3, 1, 3]
    # a stack whose readout is wider than 1 x 1: the readout's normaliser differs (gap, flatten)
    stack = serial(ConvRelu(), AvgPool(2), ConvRelu())
    small = rng.standard_normal((2, 3, 8, 8))
    for other in (dict(), dict(pooling="flatten"), dict(pooling="lap", lap_window=2), dict(flip=True)):
        a = make_architecture(architecture=stack, **other)
        diag.diag_norms(small, a, a.layer_params(3, 8, 8))
    assert calls == [3, 3, 3, 1, 3, 2]
    monkeypatch.setattr(diag, "MEMO_BYTES", q.nbytes)       # too large to keep (with its entry)
    diag.clear_memo()
    diag.diag_norms(x, arch, params), diag.diag_norms(x, arch, params)
    assert calls[6:] == [3, 3]
    monkeypatch.setattr(diag, "MEMO_BYTES", 64 << 20)
    calls.clear()
    diag.clear_memo()
    cnn = make_architecture(depth=3)
    diag.diag_norms(x, cnn, cnn.layer_params(3, 32, 32))
    assert not len(diag._memo)                               # the CNN's recursion: not kept
    # predict: the training set's diagonals at fit only, the new image's at each call
    clf = CNTKClassifier(architecture="myrtle5", backend="numba").fit(x, [0, 1, 0])
    fitted = len(calls)
    assert sum(calls) == 6                    # the magnitude check's (not kept), the backend's
    clf.predict(y[:1]), clf.predict(y[1:2])
    assert calls[fitted:] == [1, 1, 1, 1]     # the new image's, twice: the training set's kept
    from cntk_engine import inputs
    assert len(diag._memo) and len(inputs._extremes_cache)
    ce.clear_memos()                          # both forgotten: the next predict computes them
    assert not len(diag._memo) and not len(inputs._extremes_cache)
    clf.predict(y[:1])
    assert calls[fitted + 4:] == [1, 3, 1, 3]  # the training set's again, as the new image's


CHUNKED_ARCHS = [dict(depth=4), dict(depth=3, flip=True),
                 dict(architecture=serial(ConvRelu(), AvgPool(2), ConvRelu(), ConvRelu()), flip=True)]


@pytest.mark.parametrize("backend", ["numba", "reference", "cuda layout"])
@pytest.mark.parametrize("kw", CHUNKED_ARCHS, ids=["cnn", "cnn-flip", "stack-flip"])
def test_prepare_in_chunks_is_bit_identical_to_one_call(backend, kw, rng, monkeypatch):
    """A set's diagonals are computed a chunk of images at a time (``diag.chunk_images``), each
    written into the whole set's arrays: the same bits as one call, for every backend's layout
    (the CUDA variants' with NumPy), flipped images included, the last chunk shorter."""
    from cntk_engine import diag
    from cntk_engine.arch import hflip
    from cntk_engine.backends import backend_class
    arch = make_architecture(**kw)
    params = arch.layer_params(2, 8, 8)
    x = rng.standard_normal((8, 2, 8, 8))
    x[3] = 0.0                                          # an all-zero image: zero-variance windows
    monkeypatch.setattr(diag, "CHUNK_BYTES", 3 * diag.working_bytes(arch, 8, 8))
    assert diag.chunk_images(arch, 8, 8) == 3
    if backend == "cuda layout":
        from cntk_engine.backends.cuda import CudaBackend, kernel_variants
        try:
            variants = [v["name"] for v in kernel_variants()]
        except ImportError:
            pytest.skip("the CUDA extension cntk_engine._cuda is not installed (built only when nvcc "
                        "is found at install time)")
        monkeypatch.setattr(CudaBackend, "prepare", lambda self, x: self.prepare_arrays(x, np))
        bes = [CudaBackend(arch, params, dtype, kernel=v) for v in variants
               for dtype in ("float32", "float64")]
    else:
        bes = [backend_class(backend)(arch, params, dtype) for dtype in ("float32", "float64")]
    for be in bes:
        sizes = []
        one_call = be.prepare
        be.prepare = lambda imgs: (sizes.append(len(imgs)), one_call(imgs))[1]
        chunked = be.prepare_set(x)
        assert sizes == [3, 3, 2] * (2 if arch.flip else 1)
        del be.prepare
        for got, want in [(chunked, be.prepare(x))] + ([(chunked.flipped, be.prepare(hflip(x)))]
                                                       if arch.flip else []):
            assert got.layout == want.layout and len(got.diag) == len(want.diag) >= 1
            for a, b in zip((got.images,) + got.diag, (want.images,) + want.diag):
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert (chunked.flipped is not None) == arch.flip


@pytest.mark.parametrize("kw", [dict(depth=21), dict(architecture="myrtle5")], ids=["cnn21", "myrtle5"])
def test_diagonal_working_memory_stays_within_its_estimate(kw, rng):
    """``diag.working_bytes`` bounds what one image costs while the numba backend prepares it
    (Myrtle's first stage holds its self kernel on 49 offset slices: 1.3 MB per image), so a
    chunk of ``CHUNK_BYTES`` does not grow with the set; and the magnitude check's extremes are
    the same chunked or not."""
    import tracemalloc
    from cntk_engine.backends.numba_cpu import NumbaBackend
    from cntk_engine.diag import diag_norms, working_bytes
    from cntk_engine.inputs import diagonal_extremes
    arch = make_architecture(**kw)
    params = arch.layer_params(3, 32, 32)
    x = rng.standard_normal((6, 3, 32, 32))
    be = NumbaBackend(arch, params, np.float32)
    tracemalloc.start()
    try:
        be.prepare(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.3 * len(x) * working_bytes(arch, 32, 32) <= peak <= len(x) * working_bytes(arch, 32, 32)
    q = diag_norms(x, arch, params)
    one = (q.max(axis=(2, 3)), np.where(q > 0, q, np.inf).min(axis=(1, 2, 3)))
    for chunk in (1, 4 * working_bytes(arch, 32, 32)):         # 1 image, then 4, at a time
        for a, b in zip(diagonal_extremes(x, arch, params, chunk_bytes=chunk), one):
            assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- where users meet it
def test_myrtle_store_resume_and_record(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    x = rng.standard_normal((6, 3, 32, 32))
    want = ce.gram(x, architecture="myrtle5", kernel="both", backend="numba", tile=2)
    out = tmp_path / "m.zarr"
    g = ce.gram(x, architecture="myrtle5", kernel="both", backend="numba", tile=2, out=out)
    assert g["ntk"][...].tobytes() == want[0].tobytes() and g["nngp"][...].tobytes() == want[1].tobytes()
    rec = zarr.open_group(str(out)).attrs["cntk_engine"]["architecture"]
    assert rec["name"] == "myrtle5" and rec["layers"][:3] == [["conv"], ["conv"], ["avgpool", 2, 2]]
    from cntk_engine.jobs.store import StoreMismatch
    with pytest.raises(StoreMismatch, match="architecture"):
        ce.gram(x, architecture="myrtle7", kernel="both", backend="numba", tile=2, out=out)
    with pytest.raises(StoreMismatch, match="architecture: store has 'myrtle5', this job 'cnn'"):
        ce.gram(x, depth=5, kernel="both", backend="numba", tile=2, out=out)   # the CNN of its depth


def test_myrtle_through_dask_is_bit_identical(rng):
    distributed = pytest.importorskip("distributed")
    x = rng.standard_normal((5, 3, 32, 32))
    want = ce.gram(x, architecture="myrtle5", backend="numba", tile=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        got = ce.gram(x, architecture="myrtle5", backend="numba", tile=2, client=c)
    assert got.tobytes() == want.tobytes()


def test_cli_gram_and_evaluate_with_myrtle(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    from cntk_engine import cli
    d = load_real("cifar10_jpeg_small.npz")
    np.savez(tmp_path / "c.npz", x_train=d["x_train"][:12], y_train=d["y_train"][:12],
             x_test=d["x_test"][:6], y_test=d["y_test"][:6])
    np.save(tmp_path / "x.npy", d["x_test"][:4].transpose(0, 3, 1, 2))
    rc = cli.main(["-q", "gram", str(tmp_path / "x.npy"), "--architecture", "myrtle5", "--out",
                   str(tmp_path / "g.zarr"), "--backend", "numba", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    want = ce.gram(d["x_test"][:4].transpose(0, 3, 1, 2), architecture="myrtle5", backend="numba")
    assert zarr.open_group(str(tmp_path / "g.zarr"))["ntk"][...].tobytes() == want.tobytes()
    rc = cli.main(["-q", "evaluate", str(tmp_path / "c.npz"), "--architecture", "myrtle5",
                   "--n-train", "12", "--n-test", "6", "--kernel", "both", "--backend", "numba",
                   "--no-progress", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["architecture"] == "myrtle5" and rec["depths"] == [5] and len(rec["results"]) == 2
    # named as the command line sets them; no Python constructs the command line cannot take
    for argv, msg in ((["--architecture", "myrtle5", "--depth", "5"],
                       "--architecture 'myrtle5' fixes its depth"),
                      (["--architecture", "cnn"], "needs --depth"),
                      (["--architecture", "myrtle5", "--filter-size", "5"],
                       "got --filter-size 5 (build another stack in Python with cntk_engine.serial"),
                      (["--depth", "3", "--convention", "neural_tangents", "--W-std", "-1"],
                       "--W-std must be a finite number >= 0 or left out; got -1.0")):
        rc = cli.main(["-q", "gram", str(tmp_path / "x.npy"), *argv, "--out", str(tmp_path / "o.zarr")])
        out, err = capsys.readouterr()
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    np.save(tmp_path / "m.npy", np.zeros((2, 1, 28, 28)))
    rc = cli.main(["-q", "gram", str(tmp_path / "m.npy"), "--architecture", "myrtle10", "--out",
                   str(tmp_path / "o.zarr"), "--backend", "numba"])
    out, err = capsys.readouterr()
    assert rc == 2 and "32 x 32" in err and not (tmp_path / "o.zarr").exists()


def test_estimators_take_the_architecture():
    pytest.importorskip("sklearn")
    from cntk_engine import CNTKClassifier
    d = load_real("cifar10_jpeg_small.npz")
    x, y = d["x_train"][:16].astype(np.float64) / 255.0, d["y_train"][:16]
    clf = CNTKClassifier(architecture="myrtle5", backend="numba", data_format="NHWC", ridge=0.1)
    pred = clf.fit(x[:12], y[:12]).predict(x[12:])
    assert pred.shape == (4,) and clf.get_params()["architecture"] == "myrtle5"
    with pytest.raises(ValueError, match="fixes its depth"):
        CNTKClassifier(architecture="myrtle5", depth=5, backend="numba").fit(x[:12], y[:12])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, shape, msg", [
    (dict(architecture="myrtle5"), (2, 3, 28, 28), "defined for 32 x 32"),
    (dict(architecture="myrtle6"), (2, 3, 32, 32), "architecture must be"),
    (dict(architecture="myrtle5", depth=5), (2, 3, 32, 32), "fixes its depth"),
    (dict(architecture="myrtle5", depths=[3, 5]), (2, 3, 32, 32), "fixes its depth"),
    (dict(architecture="myrtle5", filter_size=5), (2, 3, 32, 32), "3 x 3"),
    (dict(architecture=[ConvRelu(), AvgPool(2), ConvRelu()]), (2, 1, 7, 7),
     r"layer 2 of 3 \(AvgPool window 2, stride 2\) does not tile"),
    (dict(architecture=[ConvRelu(), AvgPool(2)], fix=True), (2, 1, 4, 4),
     r"fix=True needs depth >= 3 \(two or more conv layers\); got a stack with one conv layer \(depth 2\)"),
    (dict(architecture=[AvgPool(2), ConvRelu()]), (2, 1, 4, 4), "must start with a ConvRelu"),
    (dict(architecture=[ConvRelu(), AvgPool(2), AvgPool(2), ConvRelu()]), (2, 1, 8, 8),
     "layers 2 and 3 of 4 of the stack are both pooling layers.*one AvgPool"),
    (dict(architecture=[ConvRelu(), "pool"]), (2, 1, 4, 4), "layer 2 of 2 of the stack is 'pool'.*holds ConvRelu"),
    (dict(architecture=42), (2, 1, 4, 4), "architecture must be"),
    (dict(), (2, 1, 4, 4), "exactly one of depth"),
    (dict(architecture=[ConvRelu()] * 1000), (2, 1, 4, 4),      # no depth was given
     r"a stack has 1000 conv layers; at most 999 are accepted"),
])
def test_bad_combinations_are_clear_errors(kw, shape, msg):
    with pytest.raises(ValueError, match=msg):
        ce.gram(np.ones(shape), backend="numba", **kw)


def test_avgpool_arguments_and_cuda_refusal():
    with pytest.raises(TypeError, match=r"ConvRelu\(\) takes no arguments: every conv layer's "
                       "filter size is gram's filter_size="):
        ConvRelu(5)
    for bad, msg in ((dict(window=0), "window must be"), (dict(window=2, stride=3), "larger than its window"),
                     (dict(window=2.5), "window must be")):
        with pytest.raises(ValueError, match=msg):
            AvgPool(**bad)
    assert AvgPool(2).stride == 2 and AvgPool(np.int64(3), 1).window == 3
    from cntk_engine.backends import capabilities
    from cntk_engine.backends.cuda import CudaBackend
    try:
        from cntk_engine import _cuda  # noqa: F401
    except ImportError:
        pytest.skip("the CUDA extension is not installed: the CUDA backend's rules live there")
    assert CudaBackend.unsupported(make_architecture(architecture="myrtle5"), (3, 32, 32), "float32") is None
    overlapping = make_architecture(architecture=serial(ConvRelu(), AvgPool(3, 1), ConvRelu()))
    why = CudaBackend.unsupported(overlapping, (1, 8, 8), "float32")
    assert "stride equals their window" in why and "AvgPool(3, stride 1)" in why and "numba" in why
    five = make_architecture(architecture=serial(ConvRelu(), AvgPool(2), ConvRelu()), filter_size=5)
    assert "filter size 3" in CudaBackend.unsupported(five, (1, 8, 8), "float32")
    trailing = make_architecture(architecture=serial(ConvRelu(), AvgPool(3, 1)))   # in the readout
    assert CudaBackend.unsupported(trailing, (1, 8, 8), "float32") is None
    caps = capabilities(make_architecture(architecture="myrtle5"), (3, 32, 32), "float32")
    assert caps["numba"] == {"unavailable": None, "unsupported": None, "unverified": None}


def test_float32_where_a_pool_makes_c_one_in_exact_arithmetic_only():
    """The README's figure: one-channel images with filter_size=1 have c = +-1 at every entry up to
    the first pool (snapped: exact), but a pool's averages are +-1 only in exact arithmetic and
    float32 leaves them beyond the snap, at sqrt(eps)'s cost (2.8e-6 of the largest entry here,
    against 6e-8 for the CNN); float64 stays exact.  A bound, so that a change that makes it
    worse (or a snap that stops working before the pool) fails."""
    net = serial(ConvRelu(), ConvRelu(), AvgPool(2), ConvRelu(), AvgPool(2))
    x = np.random.default_rng(6).standard_normal((1, 1, 8, 8))
    x = np.concatenate([x, 3 * x, np.full((1, 1, 8, 8), 2.0)])

    def err(dtype, **arch):
        ref = ce.gram(x, filter_size=1, backend="reference", **arch)
        got = ce.gram(x, filter_size=1, backend="numba", dtype=dtype, **arch)
        return np.abs(got - ref).max() / np.abs(ref).max()
    assert err("float32", architecture=net) < 1e-5
    assert err("float32", depth=4) < 2e-7
    assert err("float64", architecture=net) < 1e-14


@pytest.mark.parametrize("backend,dtype,tol", [("reference", "float64", 1e-13), ("numba", "float64", 1e-13),
                                               ("numba", "float32", 1e-6)])
def test_constant_images_through_large_pools_are_homogeneous(backend, dtype, tol):
    """K(a 1, b 1) = a b K(1, 1) for a, b > 0 (no biases: the kernels are positively homogeneous
    in each image), a check that needs no other backend.  The float64 reference, the tests'
    oracle, broke it by 2.1e-8 through AvgPool(6) on 6 x 6 images (helper-53's audit of the CUDA
    kernels, which agreed with numba to 1e-16 there): its pools summed plainly (now compensated,
    as the fast backends' are)."""
    vals = np.array([0.5, 1.3, 0.7])
    c = ConvRelu()
    cases = [((6, 6), serial(c, AvgPool(6), c), {}),
             ((12, 12), serial(c, AvgPool(6), c, AvgPool(2)), dict(pooling="flatten")),
             ((16, 16), serial(c, AvgPool(4), c, AvgPool(4), c), {})]
    for size, net, kw in cases:
        x = vals[:, None, None, None] * np.ones((3, 1) + size)
        for k in ce.gram(x, architecture=net, backend=backend, dtype=dtype, kernel="both", **kw):
            unit = k / np.outer(vals, vals)
            assert np.abs(unit - unit[0, 0]).max() / abs(unit[0, 0]) < tol, (size, kw)


@pytest.mark.parametrize("net", [serial(ConvRelu(), AvgPool(6, 1), ConvRelu()),
                                 serial(ConvRelu(), AvgPool(4), ConvRelu(), AvgPool(2))],
                         ids=["pool6_stride1", "pool4_pool2"])
def test_pools_of_windows_equal_in_exact_arithmetic_keep_c_within_the_snap(net):
    """Constant images: every pooled entry is +-sqrt(q q') in exact arithmetic, a sum of w^4
    equal terms.  The numba kernel sums its pools in float64 (float32 kernel) or compensated
    (float64 kernel), and the diagonals compensated, so c comes out within the snap of +-1 and
    the kernel is exact; a plain sum in the compute dtype drifted by tens of ulps, which the
    arccos turned into 3.8e-8 (float64) and 1.1e-3 (float32) through the 6 x 6 pool
    (helper-52's audit), and the kernel's fastmath cancelled the compensation unless its helpers
    set fastmath=False (numba's callees inherit it)."""
    x = np.stack([np.full((3, 8, 8), v) for v in (0.7, -1.3, 2.0)])
    kw = dict(architecture=net, filter_size=1, convention="neural_tangents", kernel="both")
    ref = ce.gram(x, backend="reference", **kw)
    for dtype, tol in (("float64", 1e-13), ("float32", 1e-6)):
        got = ce.gram(x, backend="numba", dtype=dtype, **kw)
        for a, b in zip(got, ref):
            assert np.abs(a - b).max() / np.abs(b).max() < tol, (dtype, net)


def test_memo_counts_each_entry_and_keeps_its_bound():
    """memo.Memo: each entry costs its arrays' bytes and ENTRY_BYTES, so many small entries do
    not hold far more than the bound; the least recently used go first; a key put twice (two
    callers that missed it) is counted once; nothing is kept under a bound of 0."""
    from cntk_engine.memo import ENTRY_BYTES, Memo
    m = Memo()
    bound = 3 * (100 + ENTRY_BYTES)
    for k in range(5):
        assert m.put(k, k, 100, bound)
    assert len(m) == 3 and m.get(0) is None and m.get(2) == 2        # 2 now the most recent
    assert m.put(3, "again", 100, bound) and len(m) == 3 and m.get(3) == "again"
    assert m.put(5, 5, 100, bound) and m.get(4) is None and m.get(2) == 2
    assert not m.put(6, 6, bound, bound) and not m.put(7, 7, 0, 0) and m.get(7) is None
    m.clear()
    assert len(m) == 0 and m.put(8, 8, 100, bound)


def test_a_job_whose_working_memory_exceeds_the_ram_is_refused_before_any_work(monkeypatch):
    """A pooled stack holds (H W)^2 entries per thread, and the readout's weights over the
    last conv stage: on 160 x 160 images a stack ending in a pool built 5 GB of them without
    a check (killed by the OOM killer, or numpy's allocation error from inside). The float64
    oracle holds every offset of every pair. Both are refused by name, before any work; the
    CNN on the numba backend holds little and is not."""
    import cntk_engine.arrays
    from cntk_engine.backends.numba_cpu import NumbaBackend, num_threads
    monkeypatch.setattr(cntk_engine.arrays, "available_memory", lambda: 1 << 20)     # 1 MiB
    arch = make_architecture(architecture="myrtle5")
    need, what = NumbaBackend.working_memory(arch, (3, 32, 32), np.float32)
    masks = 3 * 34 * 32 * 4                     # k rows of a padded grid, float32
    assert need == num_threads() * (masks + 4 * (16 * 16) ** 2 * 8) + 3 * 8 ** 4 * 8, need
    x = np.ones((2, 3, 32, 32))
    with pytest.raises(MemoryError, match=r"^backend='numba' would hold about .* while it computes "
                       r"this job on 32 x 32 images \(\d+ thread\(s\) x 4 float64 arrays of the "
                       r"pooled stages' \(H W\)\^2 = 65,536 entries .*more than the 1.0 MiB of RAM"):
        ce.gram(x, architecture="myrtle5", backend="numba")
    with pytest.raises(MemoryError, match=r"backend='reference' would hold about .* \(about 10 "
                       r"float64 covariances over every offset, \(18 x 18\)\^2"):
        ce.gram(np.ones((2, 1, 16, 16)), depth=3, backend="reference")
    assert ce.gram(np.ones((2, 1, 16, 16)), depth=3, backend="numba").shape == (2, 2)
    # a filter far wider than the images: padded 15,000 pixels on each side (the OOM killer)
    monkeypatch.setattr(cntk_engine.arrays, "available_memory", lambda: 8 << 30)
    with pytest.raises(MemoryError, match=r"the box sums' row masks, 30001 rows of 30006 x 6 "
                       r"padded grids for filter_size=30001; .* to prepare each image's "
                       r"diagonals, its 6 x 6 pixels padded by 15000 on each side.*8.0 GiB of RAM"):
        ce.gram(np.ones((2, 1, 6, 6)), depth=3, backend="numba", filter_size=30001)
