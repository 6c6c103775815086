"""Parity with facebookresearch/classifier-balancing (cRT / tau-norm / LWS, Kang et al. ICLR 2020).

Released code used: ``data.ClassAwareSampler.ClassAwareSampler`` (4 samples per class visit, as the released stage-2
configs), ``pnorm`` and ``dotproduct_similarity`` of ``tau_norm.py`` (compiled from its source: the script loads
features at import), ``models.TauNormClassifier.DotProduct_Classifier`` (the learnable per-class ``scales``, which
is LWS despite the file name). Patched in memory: nothing but the import path (``utils`` is theirs; sklearn and
matplotlib's plotting are stubbed when absent).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from tests.parity._refcode import import_released, max_abs, record, released_functions, repo, stub

REPO = repo("classifier-balancing")
STUBS = {"sklearn": stub("sklearn"), "sklearn.metrics": stub("sklearn.metrics", f1_score=None)}
COUNTS = [200, 120, 70, 40, 25, 15, 9, 5]


def test_class_aware_sampler_draw_statistics():
    """Per-class draw frequencies, epoch length and the runs of 4 same-class samples of one epoch (with python's
    ``random`` seeded for theirs, torch for ltbench's), over 5 epochs."""
    from ltbench.augment import ClassBalancedSampler

    module = import_released(REPO, "data.ClassAwareSampler")
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    random.seed(0)
    theirs = module.ClassAwareSampler(SimpleNamespace(labels=labels.tolist()), num_samples_cls=4)
    freq_diff, length_diff, run_diff, coverage_diff = 0.0, 0, 0.0, 0.0
    for epoch in range(5):
        a = np.array(list(theirs))
        b = np.array(list(ClassBalancedSampler(labels, torch.Generator().manual_seed(epoch))))
        length_diff = max(length_diff, abs(len(a) - len(b)))
        fa = np.bincount(labels[a], minlength=len(COUNTS)) / len(a)
        fb = np.bincount(labels[b], minlength=len(COUNTS)) / len(b)
        freq_diff = max(freq_diff, max_abs(fa, fb))
        runs = [np.mean(labels[x][: len(x) // 4 * 4].reshape(-1, 4).std(axis=1) == 0) for x in (a, b)]
        run_diff = max(run_diff, abs(runs[0] - runs[1]))
        # every image of a class is drawn before any repeats (RandomCycleIter): distinct images seen per class
        cover = [np.array([len(set(x[labels[x] == c])) / COUNTS[c] for c in range(len(COUNTS))]) for x in (a, b)]
        coverage_diff = max(coverage_diff, max_abs(cover[0], cover[1]))
    assert record("ClassAwareSampler epoch length (samples)", length_diff) == 0
    # each class gets floor or ceil of (visits / C) visits of 4: frequencies within 4 / epoch length of 1 / C
    assert record("ClassAwareSampler per-class frequency, 5 epochs", freq_diff) <= 8 / len(labels) / len(COUNTS)
    assert record("ClassAwareSampler share of 4-sample same-class runs", run_diff) == 0
    assert record("ClassAwareSampler distinct images drawn per class (fraction)", coverage_diff) == 0


def test_tau_normalisation():
    from ltbench.methods.tau_norm import NormalisedClassifier

    fns = released_functions(REPO / "tau_norm.py", ("pnorm", "dotproduct_similarity"), {"torch": torch})
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 64, generator=gen) * torch.linspace(0.2, 3, 10).unsqueeze(1)
    features = torch.randn(32, 64, generator=gen)
    worst = 0.0
    for tau in (0.0, 0.5, 0.7, 1.0, 1.5):
        theirs = fns["dotproduct_similarity"](features, fns["pnorm"](weight, tau))
        with torch.no_grad():
            ours = NormalisedClassifier(weight, tau)(features)
        worst = max(worst, max_abs(ours, theirs))
    assert record("tau-norm logits, tau in {0, .5, .7, 1, 1.5} (float32)", worst) <= 1e-5


def test_lws_scaling_and_gradient():
    from ltbench.methods.lws import ScaledClassifier

    module = import_released(REPO, "models.TauNormClassifier", stubs=STUBS)
    torch.manual_seed(0)
    theirs = module.DotProduct_Classifier(num_classes=10, feat_dim=64).double()
    with torch.no_grad():
        theirs.scales.copy_(torch.linspace(0.5, 2.0, 10))
    fc = torch.nn.Linear(64, 10).double()
    fc.load_state_dict(theirs.fc.state_dict())
    ours = ScaledClassifier(fc, 10).double()
    with torch.no_grad():
        ours.scales.copy_(theirs.scales)
    x = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    out_theirs, _ = theirs(x)
    out_ours = ours(x)
    g_theirs = torch.autograd.grad(torch.nn.functional.cross_entropy(out_theirs, y), theirs.scales)
    g_ours = torch.autograd.grad(torch.nn.functional.cross_entropy(out_ours, y), ours.scales)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["scales"] and [n for n, p in theirs.named_parameters() if p.requires_grad] == ["scales"]
    assert record("LWS logits (float64)", max_abs(out_ours, out_theirs)) <= 1e-12
    assert record("LWS gradient wrt the scales (float64)", max_abs(g_ours, g_theirs)) <= 1e-12
