"""CuPy specifics: fused kernel, device handling, in place. Runs only with a CUDA device.

The generic trajectory tests (test_array_trajectories.py) also run on CuPy through the ``backend``
fixture when a device is present.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from array_helpers import CUPY_SKIP, STEPS, _data, cupy_available, reference, settings

from xpoptim.adapters import cupy as C
from xpoptim.adapters import numpy as N
from xpoptim.core import ELEMENTWISE, get_spec

pytestmark = pytest.mark.skipif(not cupy_available(), reason=CUPY_SKIP)


def _cp():
    import cupy

    return cupy


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_fused_step_matches_core_in_float32(name: str) -> None:
    cp = _cp()
    shapes = [(1000,), (3, 5), (), (257,)]
    params, grads, var = _data(1, STEPS, shapes)
    ref = reference(name, settings(name), [p.astype(np.float32) for p in params], [[g.astype(np.float32) for g in gs] for gs in grads], [[v.astype(np.float32) for v in vs] for vs in var])
    arrays = [cp.asarray(p.astype(np.float32)) for p in params]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = C.create(name, arrays, **settings(name))
        for t in range(STEPS):
            ex = {"grad_variance": [cp.asarray(v.astype(np.float32)) for v in var[t]]} if get_spec(name).extras else {}
            opt.step([cp.asarray(g.astype(np.float32)) for g in grads[t]], **ex)
    fusable = get_spec(name).is_fusable(get_spec(name).validate(**settings(name)))
    if not opt.fused:
        assert any("op by op" in str(w.message) for w in rec), "an unfused CuPy step must say so"
    if fusable:
        print(f"{name}: fused={opt.fused}", [str(w.message) for w in rec])
    # CuPy float32 (fused: the compiler may contract to FMA) vs the NumPy float32 reference: float32
    # rounding differences over a few steps.
    for a, r in zip(arrays, ref):
        np.testing.assert_allclose(cp.asnumpy(a), r, rtol=2e-5, atol=2e-6)


def test_adamw_is_fused() -> None:
    cp = _cp()
    p = cp.ones(1000, dtype=cp.float32)
    opt = C.AdamW([p], lr=0.1)
    opt.step([cp.ones(1000, dtype=cp.float32)])
    assert opt.fused is True


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_fusable_rule_is_fused(name: str) -> None:
    """A rule whose ops ``cupy.fuse`` supports runs as one fused kernel (the sign rules included)."""
    cp = _cp()
    hp = settings(name)
    spec = get_spec(name)
    if not spec.is_fusable(spec.validate(**hp)):
        pytest.skip(f"{name} with {hp} calls erf, which cupy.fuse does not support")
    p = cp.ones(1000, dtype=cp.float32)
    opt = C.create(name, [p], **hp)
    ex = {"grad_variance": [cp.ones(1000, dtype=cp.float32)]} if spec.extras else {}
    opt.step([cp.full(1000, 0.5, dtype=cp.float32)], **ex)
    assert opt.fused is True


def test_fused_sign_propagates_nan_like_numpy() -> None:
    """MSSD's fused ``sign`` keeps NumPy's ``sign(nan) = nan`` and ``sign(0) = 0``."""
    cp = _cp()
    g = np.array([np.nan, 0.0, -2.0, 3.0], dtype=np.float32)
    p_np = np.zeros(4, dtype=np.float32)
    N.MSSD([p_np], lr=0.1).step([g.copy()])
    p_cp = cp.zeros(4, dtype=cp.float32)
    opt = C.MSSD([p_cp], lr=0.1)
    opt.step([cp.asarray(g)])
    assert opt.fused is True
    np.testing.assert_array_equal(cp.asnumpy(p_cp), p_np)


def test_fuse_false_runs_op_by_op_and_says_so() -> None:
    cp = _cp()
    p = cp.ones(10, dtype=cp.float32)
    with pytest.warns(UserWarning, match="op by op"):
        opt = C.AdamW([p], lr=0.1, fuse=False)
        opt.step([cp.ones(10, dtype=cp.float32)])
    assert opt.fused is False


def test_in_place_and_current_device() -> None:
    cp = _cp()
    w = cp.ones((3, 4))
    b = cp.ones(4)
    opt = C.SGD({"w": w, "b": b}, lr=0.5)
    opt.step({"w": cp.ones((3, 4)), "b": cp.ones(4)})
    assert float(w[0, 0]) == 0.5 and float(b[0]) == 0.5


def test_mixed_devices_are_refused() -> None:
    cp = _cp()
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    a = cp.ones(3)
    with cp.cuda.Device(1):
        b = cp.ones(3)
    with pytest.raises(ValueError, match="several devices"):
        C.Adam([a, b])


def test_checkpoint_moves_between_cupy_and_numpy() -> None:
    cp = _cp()
    from xpoptim.adapters import numpy as N

    params, grads, _ = _data(2, 4, [(5,), (3, 3)])
    on_gpu = [cp.asarray(p) for p in params]
    g_opt = C.MVNGrad(on_gpu, lr=0.01)
    for g in grads[:2]:
        g_opt.step([cp.asarray(x) for x in g])
    host = [cp.asnumpy(a) for a in on_gpu]
    n_opt = N.MVNGrad(host)
    n_opt.load_state_dict(g_opt.state_dict())
    for g in grads[2:]:
        g_opt.step([cp.asarray(x) for x in g])
        n_opt.step(g)
    for a, h in zip(on_gpu, host):
        np.testing.assert_allclose(cp.asnumpy(a), h, rtol=1e-12, atol=1e-14)
