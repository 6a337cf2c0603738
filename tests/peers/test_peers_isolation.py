"""Running the peers' suites leaves the process as the rest of the suite expects."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch's test utilities need expecttest (the test extra installs it)")


def test_backend_flags_stay_settable_after_torch_test_utilities_are_imported():
    import peers.torch_optim_db  # noqa: F401  (imports torch.testing._internal.common_utils)

    from xpoptim._backends import pinned_numerics  # the verifier's context: sets torch.backends.cudnn.allow_tf32

    old = torch.backends.cudnn.allow_tf32
    with pinned_numerics():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == old
