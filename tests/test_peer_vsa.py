"""FastVideo's own VSA (fastvideo-kernel's Triton kernels) against fastwan's, on a CPU.

The peer is not part of fastwan: ``.ci/run`` fetches its source distribution with pip
(``scripts/fetch_peer.sh``) and passes ``FASTWAN_PEER_SRC`` (the unpacked folder). The
kernels run on the Triton 3.7 that script puts beside it, or ``FASTWAN_PEER_TRITON`` (a
folder holding Triton 3.7 or 3.8): the peer's forward kernel uses ``tl.make_block_ptr``,
which Triton 3.9 removed, and 3.6's interpreter fails on NumPy 2.
Its kernels run under the Triton interpreter in a subprocess (``tests/_peer_worker.py``:
the interpreter and that Triton must be chosen before Python starts), forward and
gradients, bfloat16 (the only dtype it computes in), against a float64 oracle with the
low-precision rule: error <= FACTOR x PyTorch's own bfloat16 VSA.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

from fastwan.attention import get_tile_plan, video_sparse_attention
from fastwan.bench.peer import PeerVSA, fetched_triton, separable_inputs
from tests._rules import FACTOR

ROOT = Path(__file__).resolve().parents[1]
PEER_SRC = os.environ.get("FASTWAN_PEER_SRC")
PEER_TRITON = os.environ.get("FASTWAN_PEER_TRITON")


def _triton_version() -> tuple[int, int] | None:
    try:
        return tuple(int(x) for x in version("triton").split(".")[:2])  # type: ignore[return-value]
    except PackageNotFoundError:
        return None


def _peer_source() -> Path:
    src = Path(PEER_SRC) if PEER_SRC else None
    if src is None or not (src / "python" / "fastvideo_kernel").is_dir():
        pytest.skip(
            "FastVideo's VSA source is not available: set FASTWAN_PEER_SRC to the unpacked "
            "fastvideo-kernel 0.3.5 source distribution (bash scripts/fetch_peer.sh DIR; "
            ".ci/run does)"
        )
    return src


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The worker's report and the benchmark's JSON, from one subprocess."""
    src = _peer_source()
    path = [str(ROOT)]
    triton_dir = PEER_TRITON or fetched_triton(src)  # fetch_peer.sh puts one beside src
    if triton_dir:
        path.insert(0, str(triton_dir))
    elif not (3, 7) <= (_triton_version() or (0, 0)) < (3, 9):
        pytest.skip(
            "the peer's Triton kernels need Triton 3.7 or 3.8 (3.9 removed tl.make_block_ptr, "
            "3.6's interpreter fails on NumPy 2): set FASTWAN_PEER_TRITON to a folder holding "
            "one (scripts/fetch_peer.sh installs 3.7.0 beside the source)"
        )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    bench_json = tmp_path_factory.mktemp("peer") / "bench.json"
    cmd = [sys.executable, "-m", "tests._peer_worker", str(src), str(bench_json)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return report, json.loads(bench_json.read_text())


def test_peer_layout_is_fastwans_tile_order(worker):
    report, _ = worker
    assert report["version"] == "0.3.5"
    assert report["layout_matches"]


@pytest.mark.parametrize("i", [0, 1], ids=["gated", "fine-stage"])
def test_peer_matches_fastwan_forward_and_gradients(worker, i):
    c = worker[0]["cases"][i]
    assert c["same_tiles"] and c["selected_per_row"] == [c["topk"]]
    assert c["finite"] and c["dtypes"] == ["torch.bfloat16"]
    names = ["out", "dq", "dk", "dv"] + (["dgate"] if c["gated"] else [])
    assert sorted(c["budget"]) == sorted(names)
    for who in ("peer", "fastwan"):
        for name in names:
            err, budget = c["errors"][who][name], c["budget"][name]
            assert 0 < err <= FACTOR * budget, f"{who} {name}: {err:.3g} > {FACTOR} x {budget:.3g}"
    for name in names:  # so the two differ by no more than their two errors allow
        assert c["between"][name] <= 2 * FACTOR * c["budget"][name], name


def test_bench_attention_peer_on_cpu(worker):
    bench = worker[1]
    assert bench["benchmark"] == "attention_peer" and bench["triton_interpreter"]
    assert bench["complete"] and bench["fastwan_backends"] == ["triton"]
    impls = bench["peer"]["implementations"]
    assert impls["triton"]["available"] and impls["triton"]["reason"] is None
    assert not impls["cuda"]["available"] and "CUDA" in impls["cuda"]["reason"]
    (check,) = bench["checks"]
    assert check["same_tiles"] and check["query_tiles_same_fraction"] == 1.0
    assert check["within_rule"] == {"fastwan_triton": True, "peer_triton": True}
    (row,) = bench["results"]
    assert row["grid"] == [5, 6, 9] and row["mode"] == "fwd+bwd" and row["topk"] == 2
    t = row["times_s"]
    assert set(t) == {"dense", "fastwan_triton", "peer_triton"} and min(t.values()) > 0
    assert math.isclose(row["ratios"]["dense/peer_triton"], t["dense"] / t["peer_triton"])
    ratio = row["ratios"]["peer_triton/fastwan_triton"]
    assert math.isclose(ratio, t["peer_triton"] / t["fastwan_triton"])
    behind = [s for s in bench["fastwan_behind"] if "(5, 6, 9)" in s]
    assert bool(behind) == (ratio < 1)


def test_separable_inputs_make_the_selection_unambiguous():
    """Each query tile's top-k is a whole group with a clear margin, at float64, and fastwan
    selects exactly those tiles from the bfloat16 inputs."""
    grid, topk, D = (5, 10, 13), 3, 16  # 2 x 3 x 4 = 24 tiles, 8 groups
    q, k, v, g = separable_inputs(1, 2, grid, D, topk, torch.Generator().manual_seed(0))
    assert q.shape == k.shape == v.shape == g.shape == (1, 2, 650, D)
    plan = get_tile_plan(grid)
    scores = plan.tile_mean(q.double()) @ plan.tile_mean(k.double()).transpose(-1, -2)
    top = scores.sort(-1, descending=True).values
    assert (top[..., topk - 1] - top[..., topk]).min() > 0.9  # strength**2 = 1 vs ~0
    _, idx = video_sparse_attention(
        *(t.bfloat16() for t in (q, k, v)), grid=grid, topk=topk, backend="torch",
        return_indices=True,
    )  # fmt: skip
    expected = scores.topk(topk, -1).indices.sort(-1).values
    assert torch.equal(idx, expected)
    with pytest.raises(ValueError, match="head_dim=4 is too small"):
        separable_inputs(1, 1, grid, 4, topk, torch.Generator())


def test_peer_errors_name_the_fix(tmp_path):
    from fastwan.bench import attention

    with pytest.raises(ValueError, match="--peer-src"):
        PeerVSA(tmp_path)
    parser = __import__("argparse").ArgumentParser()
    attention.add_arguments(parser)
    for argv, match in (
        (["--peer", "fastvideo", "--dtype", "float16"], "bfloat16 only"),
        (["--peer", "fastvideo", "--head-dim", "40"], "power of two"),
        (["--peer", "fastvideo", "--grids", "5x6"], "TxHxW"),
        (["--peer-src", str(tmp_path)], "need --peer fastvideo"),
        (["--peer", "fastvideo", "--peer-src", str(tmp_path), "--device", "cpu"], "--peer-src"),
    ):
        with pytest.raises(ValueError, match=match):
            attention.run(parser.parse_args(argv))


@pytest.mark.skipif(
    (_triton_version() or (0, 0)) < (3, 9), reason="only Triton >= 3.9 lacks tl.make_block_ptr"
)
def test_triton_without_block_pointers_is_refused_with_the_reason():
    peer = PeerVSA(_peer_source())
    assert peer.version == "0.3.5"
    why = peer.available("triton", torch.device("cpu"))
    assert "tl.make_block_ptr" in why and "Triton 3.9" in why
    fetched = fetched_triton(peer.src)  # the fix names the Triton fetched beside the source
    assert (f"PYTHONPATH={fetched}" in why) if fetched else "Triton 3.7 or 3.8" in why
    assert "CUDA device" in peer.available("cuda", torch.device("cpu"))


def test_peer_report_names_where_fastwan_is_behind(tmp_path):
    """The report rewritten after every case: rows so far, ``complete`` False, and every
    row where the peer was faster listed as a finding."""
    from fastwan.bench import attention

    times = {"dense": 4.0, "fastwan_triton": 2.0, "peer_triton": 1.0, "peer_cuda": 3.0}
    row = attention._peer_row(
        (21, 30, 52), 0.9, 59, 585, "fwd", times, ["triton"], ["triton", "cuda"]
    )
    assert row["ratios"]["peer_triton/fastwan_triton"] == 0.5
    assert row["ratios"]["dense/fastwan_triton"] == 2.0
    report = attention._peer_report(
        {"benchmark": "attention_peer"}, [], [row], ["triton", "cuda"], False
    )
    assert report["complete"] is False and report["results"] == [row]
    (finding,) = report["fastwan_behind"]  # peer_cuda (3 s) is behind fastwan (2 s)
    assert "peer_triton" in finding and "(21, 30, 52)" in finding and "fwd" in finding
    path = tmp_path / "r.json"
    attention._write_json(str(path), report)
    assert json.loads(path.read_text()) == report and not (tmp_path / "r.json.tmp").exists()
