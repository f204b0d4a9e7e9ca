"""Diagnostics read off a loss curve: plateau and divergence on synthetic curves."""

from lorakit import monitor


def test_plateau_diagnosis_on_synthetic_curves():
    steps = list(range(1, 31))
    flat = [3.0 - 0.5 * min(s, 10) / 10 for s in steps]  # falls to 2.5, then flat
    d = monitor.check_plateau(steps, flat, r=2, lr=1e-5)
    assert d.kind == "plateau" and "rank (r=2) may be too low" in d.message and "(1e-05) too small" in d.message
    learning = [3.0 * 0.9 ** s for s in steps]
    assert monitor.check_plateau(steps, learning, r=2, lr=1e-3) is None
    converged = [3.0 * 0.5 ** min(s, 10) for s in steps]  # flat, but far below the start
    assert monitor.check_plateau(steps, converged, r=2, lr=1e-3) is None
    assert monitor.check_divergence(5, float("nan"), 1.0, 1e-3, True).kind == "diverged"
    assert monitor.check_divergence(5, 3.5, 1.0, 1e-3, True) is not None
    assert monitor.check_divergence(5, 1.4, 0.45, 1e-3, True) is None  # 3.1x, but only 0.95 nats up
    assert monitor.check_divergence(18, 0.0198, 0.0042, 1e-3, True) is None  # noise near convergence
    assert monitor.check_divergence(5, 3.5, 1.0, 1e-3, False) is None  # warm-up spikes are tolerated


def test_curve_check_takes_the_objectives_plateau_rule():
    steps = list(range(1, 31))
    flat = [{"step": s, "loss": 3.0 - 0.5 * min(s, 10) / 10, "grad_norm": 1.0} for s in steps]
    losses = [x["loss"] for x in flat]
    default = monitor.check_curve(flat, 1e-5, 2)
    assert default == monitor.check_plateau(steps, losses, r=2, lr=1e-5) and default.kind == "plateau"
    assert monitor.check_curve(flat, 1e-5, 2, monitor.PLATEAU_MIN_PROGRESS) == default
    assert monitor.check_curve(flat, 1e-5, 2, None) is None          # the objective's curve is not judged
    assert monitor.check_curve(flat, 1e-5, 2, 0.9) is None          # 2.5 <= 0.9 x 3.0: progress enough
    collapsed = flat[:-3] + [{**x, "grad_norm": 0.0} for x in flat[-3:]]
    assert monitor.check_curve(collapsed, 1e-5, 2, None).kind == "collapsed"  # a collapse still is one
