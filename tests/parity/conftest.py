"""Parity checks against the authors' released code (issue #21): fixtures and the summary of measured numbers.

Run them with ``LTBENCH_REFERENCE_CODE=/path/to/checkouts pytest tests/parity``; without the variable every module
skips itself with one line (``_refcode.repo``). The measured max-abs differences are printed at the end of the run
(and written to the JSON file named by ``LTBENCH_PARITY_REPORT``, if set).
"""

from __future__ import annotations

import pytest

from tests.parity import _refcode


@pytest.fixture
def cuda_as_cpu(monkeypatch):
    """The released code calls ``.cuda()``, ``torch.cuda.FloatTensor`` and ``.to('cuda')`` unconditionally; this
    CPU-only machine has no CUDA. Patched in memory for one test: ``.cuda()`` is the identity, the CUDA float tensor
    type is the CPU one, a move to a CUDA device stays on the CPU and ``torch.cuda.synchronize`` does nothing."""
    import torch

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "FloatTensor", torch.FloatTensor)
    monkeypatch.setattr(torch.cuda, "LongTensor", torch.LongTensor)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            return self
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)


@pytest.fixture(autouse=True)
def _float64_default_off():
    """Tests that switch the default dtype to float64 get it back afterwards."""
    import torch

    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


def pytest_terminal_summary(terminalreporter):
    if not _refcode.MEASURED:
        return
    terminalreporter.section("parity: max abs differences measured")
    for entry in _refcode.MEASURED:
        note = f"  ({entry['note']})" if entry["note"] else ""
        terminalreporter.write_line(f"{entry['component']:<70} {entry['max_abs_diff']:.3e}{note}")
