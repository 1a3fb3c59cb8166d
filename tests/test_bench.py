"""benchmarks/bench.py: the references it compares against are right, and --quick produces every figure.

No timing is asserted (timings are the benchmark's output, not a property of the code).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench  # noqa: E402
from buddy_pool import BuddyPool  # noqa: E402
from maxsim_loss import maxsim_scores  # noqa: E402


def test_loop_reference_matches_buddy_pool_including_border_windows():
    # 4x4 grid, k=3: most windows are clipped, so the loop's slicing and the logits it softmaxes over are
    # checked against BuddyPool's masked softmax; non-zero parameters so that the check means something.
    g = torch.Generator().manual_seed(0)
    cues, patches = torch.randn(3, 5, 16, generator=g), torch.randn(3, 4, 4, 16, generator=g)
    pool = BuddyPool(16)
    with torch.no_grad():
        pool.window_logits.copy_(torch.randn(9, generator=g))
        pool.proj.weight.copy_(0.1 * torch.randn(16, 16, generator=g))
        pool.proj.bias.copy_(0.1 * torch.randn(16, generator=g))
    torch.testing.assert_close(bench.buddy_pool_loop(pool, cues, patches), pool(cues, patches))


def test_einsum_reference_is_the_same_quantity_as_maxsim_scores():
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(4, 3, 8, generator=g), torch.randn(5, 6, 8, generator=g)
    expected = torch.tensor([[max(float(qi @ dj) for dj in d[b]) for qi in q[a]] for a in range(4) for b in range(5)])
    expected = expected.sum(-1).view(4, 5)                       # sum over query tokens of the best doc token
    torch.testing.assert_close(bench.einsum_maxsim(q, d), expected)
    torch.testing.assert_close(maxsim_scores(q, d, normalize=False, reduction="sum"), expected)


def test_bad_device_is_one_line_and_exit_2(capsys):
    assert bench.main(["--device", "tpu9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory is read from /proc")
def test_quick_run_produces_every_figure(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["figures"]) == list(bench.FIGURES)
    for name, figure in results["figures"].items():
        assert isinstance(figure["value"], float) and math.isfinite(figure["value"]), (name, figure)
        assert figure["target"] == bench.FIGURES[name][0]
        assert figure["met"] == bench.judge(name, figure["value"])
        assert name in run.stdout                                # the table shows it too
    # The memory method reads a known allocation at about its size (pages, allocator headers: +-1 MiB).
    calibration = results["figures"]["maxsim_scores_vs_einsum_peak_memory"]["calibration"]
    assert abs(calibration["measured_bytes"] - calibration["allocated_bytes"]) < 2 ** 20
    assert results["machine"]["torch"] == torch.__version__
