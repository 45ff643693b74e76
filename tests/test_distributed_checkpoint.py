"""Checkpoints (DCP, one path for 1 and N processes): saved by 2 gloo processes, resumed
by 2 and by 1; saved by 1, resumed by 2; refused in an older format.

Run A trains the tiny DMD setup of ``tests/_dist.py`` for 3 steps with FSDP over 2
processes and saves a checkpoint after step 2. From that checkpoint:

* B: the same 2-process FSDP mesh resumes and must continue exactly as A did (bitwise:
  the same operations on the same shards);
* C: 2 processes on another mesh (replicate 2: every rank holds the full parameters, DCP
  reshards) continue with the same losses (rtol 1e-5, parameters atol 5e-6: the gradient
  reduction differs in summation order);
* one process (the data-parallel emulation of ``_dist.EmulatedRanks``) loads the shards
  into plain tensors and continues with A's losses (same tolerances);
* ``fastwan export`` consolidates the sharded generator (and its EMA) into a Diffusers
  folder equal to what the one process loaded;
* one plain process (data-parallel size 1) resumes at the same place in the data: the
  sampler position is translated from 2 data-parallel ranks to 1;
* D: a one-process checkpoint resumes on 2 FSDP processes (E: on 2 replicating
  processes): every rank loads its shards (E: full copies) of the networks, optimizer
  states and EMA, and the data position is translated from 1 data-parallel rank to 2.

A checkpoint of format version 1 (the safetensors / ``trainer_state.pt`` layout of older
fastwan) is refused by resume and export, naming the version and the fix.
"""

from __future__ import annotations

import pytest
import torch
from _dist import (
    adam_v_total,
    assert_same_losses,
    assert_same_params,
    dmd_method,
    losses,
    rank_loader,
    reference_run,
    spawn,
    tiny_recipe,
    train_worker,
)
from _tiny_wan import build_tiny_wan, write_random_video_shard
from safetensors.torch import load_file

from fastwan.data.sampler import DistributedSampler
from fastwan.train.checkpoint import (
    CHECKPOINT_VERSION,
    DCP_DIR,
    read_marker,
    read_trainer_state,
    reshard_sampler_state,
)
from fastwan.train.checkpoint_io import COMPLETE_MARKER, latest_checkpoint
from fastwan.train.trainer import Trainer

STEPS, SAVE_AT = 3, 2


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=2)


def _export(args: list[str]) -> int:
    import fastwan.cli as cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ["fastwan.commands.train"]
    try:
        return cli.main(["export", *args])
    finally:
        cli.COMMAND_MODULES = saved


@pytest.fixture(scope="module")
def runs(wan_path, tmp_path_factory):
    """Runs A, B, C, D, E (see the module docstring) in the same two processes; D and E
    resume the one-process checkpoint ``one`` (returned with its trainer)."""
    root = tmp_path_factory.mktemp("dist_runs")
    one_recipe = tiny_recipe(root / "one", steps=STEPS, accumulation=2)
    one = Trainer(dmd_method(wan_path, one_recipe), one_recipe, rank_loader(0, 1))
    one.train(SAVE_AT)
    one_ckpt = one.save_checkpoint()
    run = root / "run"
    ckpt = run / f"checkpoint-{SAVE_AT}"
    base = {"wan": str(wan_path), "world": 2, "steps": STEPS}
    cfgs = [
        {**base, "out": str(run), "save_at": SAVE_AT, "result": str(root / "A.pt")},
        {**base, "out": str(root / "B"), "resume": str(ckpt), "result": str(root / "B.pt")},
        {**base, "out": str(root / "C"), "resume": str(ckpt), "result": str(root / "C.pt"),
         "replicate": 2, "shard": 1},
        {**base, "out": str(root / "D"), "resume": str(one_ckpt), "result": str(root / "D.pt")},
        {**base, "out": str(root / "E"), "resume": str(one_ckpt), "result": str(root / "E.pt"),
         "replicate": 2, "shard": 1},
    ]  # fmt: skip
    spawn(train_worker, 2, cfgs)
    results = {n: torch.load(root / f"{n}.pt", weights_only=True) for n in "ABCDE"}
    return run, ckpt, results, one


def test_sharded_checkpoint_resumes_on_2_and_1_processes(wan_path, tmp_path, runs):
    run, ckpt, results, _ = runs
    a, b, c = results["A"], results["B"], results["C"]

    # the checkpoint: complete, atomic, versioned; every piece in DCP, each rank its shards
    assert latest_checkpoint(run) == ckpt and (ckpt / COMPLETE_MARKER).is_file()
    names = sorted(p.name for p in run.iterdir())
    assert [n for n in names if "checkpoint" in n] == [ckpt.name]  # no temporary leftovers
    files = {p.name for p in ckpt.iterdir()}
    assert files == {DCP_DIR, "recipe.yaml", "checksums.json", COMPLETE_MARKER}
    marker = read_marker(ckpt)
    assert (marker["format"], marker["version"]) == ("fastwan-dcp", CHECKPOINT_VERSION)
    assert marker["step"] == SAVE_AT and marker["method"] == "dmd"
    assert marker["layout"] == {"world_size": 2, "dp_size": 2, "sequence_parallel": 1}
    assert marker["networks"] == ["critic", "generator"] and marker["ema"] == ["generator"]
    assert len(list((ckpt / DCP_DIR).glob("*.distcp"))) == 2  # each rank wrote its shards
    state = read_trainer_state(ckpt)  # the plain pieces, without a process group
    assert state["step"] == SAVE_AT and losses(state["history"]) == losses(a["history"][:SAVE_AT])
    assert state["data"]["dp_size"] == 2 and state["data"]["position"] == SAVE_AT

    # B: same mesh -> exactly A's continuation (the restored history included)
    assert losses(b["history"]) == losses(a["history"])
    for role in a["params"]:
        for name, value in a["params"][role].items():
            assert torch.equal(b["params"][role][name], value), (role, name)
    # C: another mesh, resharded on load
    assert_same_losses(c["history"], a["history"])
    for role in a["params"]:
        assert_same_params(c["params"][role], a["params"][role])

    # one process: the shards load into plain tensors and training continues as A did
    trainer, method = reference_run(wan_path, tmp_path / "one", steps=STEPS)
    assert trainer.resume(ckpt) == ckpt and trainer.step == SAVE_AT
    method.load_rank_generators(ckpt)
    loaded = {n: p.detach().clone() for n, p in trainer.networks["generator"].named_parameters()}
    ema = {n: t.clone() for n, t in trainer.ema.shadow.items()}
    assert any(not torch.equal(ema[n], loaded[n]) for n in ema)
    trainer.train(STEPS - SAVE_AT)
    assert_same_losses(trainer.history, a["history"])
    for role, net in trainer.networks.items():
        assert_same_params(dict(net.named_parameters()), a["params"][role])

    # export consolidates the sharded generator (and its EMA) into a Diffusers folder
    for flag, want in (([], loaded), (["--ema"], ema)):
        out = tmp_path / f"export{''.join(flag)}"
        assert _export([str(ckpt), "--out", str(out), "--model", str(wan_path), *flag]) == 0
        saved = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
        for name, value in want.items():
            assert torch.equal(saved[name], value), (flag, name)
        assert (out / "vae").is_dir() and (out / "model_index.json").is_file()


def test_resume_with_fewer_data_parallel_ranks_keeps_the_data_position(wan_path, tmp_path, runs):
    # saved by 2 data-parallel processes; resumed by ONE plain process (data-parallel size 1)
    ckpt = runs[1]
    recipe = tiny_recipe(tmp_path / "one", steps=SAVE_AT + 1, accumulation=2)
    loader = rank_loader(0, 1)
    trainer = Trainer(dmd_method(wan_path, recipe), recipe, loader, log_fn=lambda _l: None)
    trainer.resume(ckpt)
    assert trainer.step == SAVE_AT
    # 2 ranks x 2 steps x 1 sample consumed: the single rank continues at sample 4 of the
    # epoch, i.e. with the samples ranks 0 and 1 would have read at step 3
    assert (loader.sampler.epoch, loader.sampler.position) == (0, 4)
    two = [DistributedSampler(8, dp_rank=r, dp_size=2, seed=3).epoch_indices(0) for r in (0, 1)]
    assert loader.sampler.epoch_indices(0)[4:6] == [two[0][2], two[1][2]]
    record = trainer.train(1)[0]
    assert record["step"] == SAVE_AT + 1 and record["critic_loss"] > 0


def test_sampler_state_translation():
    state = DistributedSampler(8, dp_rank=1, dp_size=2, seed=3).state_dict()
    state["position"] = 3  # 6 samples consumed globally
    assert reshard_sampler_state(state, 3)["position"] == 2
    assert reshard_sampler_state(state, 2) == state
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        reshard_sampler_state(state, 4)


@pytest.mark.parametrize("run", ["D", "E"])
def test_one_process_checkpoint_resumes_on_2_processes(runs, run):
    # D: two FSDP processes (shard 2) load the one-process checkpoint and keep their
    # shards; E: two replicating processes (replicate 2) load full copies
    one, d = runs[3], runs[2][run]
    assert read_marker(one.output_dir / f"checkpoint-{SAVE_AT}")["layout"]["world_size"] == 1
    resumed = d["resumed"]
    for role, net in one.networks.items():
        for name, value in net.named_parameters():
            assert torch.equal(resumed["params"][role][name], value.detach()), (role, name)
    # the AdamW states came along (fresh ones would be zero)
    for role, opt in one.optimizers.items():
        want = adam_v_total(opt)
        assert want > 0 and abs(resumed["adam_v"][role] - want) <= 1e-6 * want, role
    # 1 rank x 2 steps x 2 micro-batches consumed = position 2 on each of 2 ranks
    assert resumed["position"] == (0, 2)
    assert losses(d["history"][:SAVE_AT]) == losses(one.history)
    last = d["history"][-1]
    assert last["step"] == SAVE_AT + 1 and last["generator_updated"]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("generator_loss", "critic_loss"))
    moved = d["params"]["generator"]
    assert any(not torch.equal(moved[n], resumed["params"]["generator"][n]) for n in moved)


def test_two_layouts_of_one_process_checkpoint_continue_alike(runs):
    # the same checkpoint resumed sharded (D) and replicated (E): the same step 3, up to
    # the summation order of the gradient reduction
    d, e = runs[2]["D"], runs[2]["E"]
    assert_same_losses(e["history"], d["history"])
    for role in d["params"]:
        assert_same_params(e["params"][role], d["params"][role])


def test_torchrun_distill_then_one_process_resume(wan_path, tmp_path, capsys):
    """The user's commands: `torchrun --nproc_per_node=2 -m fastwan.cli distill`, then
    `fastwan distill --resume latest` in one process with the mesh overridden."""
    import os
    import subprocess
    import sys

    from _dist import free_port

    (tmp_path / "data").mkdir()
    data = write_random_video_shard(tmp_path / "data", n=8)
    out = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
model: {{teacher: {wan_path}, dtype: fp32, teacher_dtype: fp32}}
train: {{method: dmd, max_steps: 2, global_batch_size: 2, mixed_precision: fp32, seed: 3,
         log_interval: 1, checkpoint_interval: 0, report_to: [], output_dir: {out}}}
parallel: {{world_size: 2, replicate: 1, shard: 2, activation_checkpointing: full}}
data: {{path: {data}, num_workers: 0, text_length: 16, num_frames: 5, height: 64, width: 64}}
optim: {{generator: {{lr: 1.0e-3}}, critic: {{lr: 1.0e-3}}}}
dmd: {{generator_update_interval: 1, guidance_scale: 3.0, flow_shift: 3.0}}
vsa: {{sparsity: 0.5, tile_size: [1, 2, 2], backend: torch}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "fastwan.cli", "distill", str(recipe),
           "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 2 steps") == 1  # rank 0 alone reports
    ckpt = out / "checkpoint-2"
    assert read_marker(ckpt)["layout"]["world_size"] == 2 and (out / "recipe.yaml").is_file()
    assert (ckpt / "recipe.yaml").is_file()  # every checkpoint holds its own recipe
    history = read_trainer_state(ckpt)["history"]
    assert [r["step"] for r in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["critic_loss"])) for r in history)

    import fastwan.cli as cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ["fastwan.commands.train"]
    try:
        rc = cli.main(["distill", str(recipe), "--resume", "latest", "--no-progress",
                       "--device", "cpu", "--train.max_steps=3", "--parallel.world_size=1",
                       "--parallel.shard=1", "--train.gradient_accumulation_steps=2"])  # fmt: skip
    finally:
        cli.COMMAND_MODULES = saved
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert "at step 2" in printed.out and "done: 1 steps" in printed.out
    state = read_trainer_state(out / "checkpoint-3")
    assert read_marker(out / "checkpoint-3")["layout"]["world_size"] == 1
    assert state["history"][:2] == history and state["step"] == 3
    # 2 ranks x 2 steps consumed 4 samples: one rank with 2 micro-batches per step is at 6
    assert (state["data"]["dp_size"], state["data"]["position"]) == (1, 6)


def _failing_save_worker(out: str, results: str) -> None:
    """Saves that fail on one rank only: rank 1 while it builds its state dicts (before
    DCP's collectives), rank 1's DCP shards on a full disk, rank 0's recipe.yaml on a full
    disk, then rank 0's commit on a read-only disk. Every rank must raise (none may hang at
    a barrier: the group's 60 s timeout would fail the test) and step 1 must stay the
    latest checkpoint."""
    import errno
    import os
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    import fastwan.train.checkpoint as ckpt
    from fastwan.train.checkpoint import PlainState, TrainingState, save_training_checkpoint
    from fastwan.train.checkpoint_io import checkpoint_dir

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    counters = {"step": 0}

    def fail(code: int):
        def raise_(*_a, **_k):
            raise OSError(code, os.strerror(code))

        return raise_

    def save(step: int, recipe=lambda f: f.write_text("recipe")) -> str:
        counters["step"] = step
        state = TrainingState(
            networks={"generator": net}, optimizers={"generator": opt},
            schedulers={"generator": sched},
            trainer=PlainState(lambda: dict(counters), counters.update),
            generators={"train": torch.Generator()},
        )  # fmt: skip
        try:
            save_training_checkpoint(
                checkpoint_dir(out, step), state, metadata={"step": step},
                extra_files={"recipe.yaml": recipe},
            )  # fmt: skip
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return "saved"

    lines = [save(1)]
    real_save, real_rng, real_commit = (
        torch.save,
        ckpt.capture_rng_state,
        ckpt.commit_checkpoint_dir,
    )
    if rank == 1:  # its state dicts, before DCP: a bug, not a disk
        ckpt.capture_rng_state = lambda *_a: 1 / 0
    lines.append(save(2))
    ckpt.capture_rng_state = real_rng
    if rank == 1:  # inside DCP's collective write (which raises CheckpointException)
        torch.save = lambda obj, f, *a, **k: (
            fail(errno.ENOSPC)() if isinstance(obj, torch.Tensor) else real_save(obj, f, *a, **k)
        )
    lines.append(save(3))
    torch.save = real_save
    full = fail(errno.ENOSPC) if rank == 0 else None  # rank 0's recipe.yaml: disk full
    lines.append(save(4, recipe=full) if full else save(4))
    if rank == 0:  # rank 0's commit, while rank 1 waits for it
        ckpt.commit_checkpoint_dir = fail(errno.EROFS)
    lines.append(save(5))
    ckpt.commit_checkpoint_dir = real_commit
    Path(results, f"rank{rank}.txt").write_text("\n".join(lines))
    dist.destroy_process_group()


def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    spawn(_failing_save_worker, 2, str(out), str(results))
    got = {r: (results / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)}
    for r in (0, 1):
        assert got[r][0] == "saved"
        for step, reason in ((3, "disk full (no space left on device)"),
                             (4, "disk full (no space left on device)"),
                             (5, "read-only file system")):  # fmt: skip
            line = got[r][step - 1]
            assert line.startswith("WriteError: ") and f"checkpoint-{step}" in line, line
            assert reason in line, line
        assert "on rank 1, in torch.distributed.checkpoint" in got[r][2]
    assert got[1][1] == "ZeroDivisionError: division by zero"  # its own error, as it was
    assert got[0][1].startswith("WriteError: saving checkpoint") and "checkpoint-2" in got[0][1]
    assert "failed on rank 1: ZeroDivisionError" in got[0][1]
    assert "failed on rank 0" in got[1][3] and "failed on rank 0" in got[1][4]
    assert latest_checkpoint(out) == out / "checkpoint-1"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no leftovers
    assert (out / "checkpoint-1" / "recipe.yaml").read_text() == "recipe"


def _v1_checkpoint(root, *, sharded: bool):
    """A checkpoint as fastwan wrote it before format version 2 (no version in the marker):
    one process: <role>.safetensors + trainer_state.pt + rng_rank0.pt; N processes: dcp/ +
    trainer_state.pt + rng_rank<R>.pt, marker format "dcp"."""
    from fastwan.train.checkpoint_io import checkpoint_dir, save_checkpoint

    def write(tmp):
        if sharded:
            (tmp / "dcp").mkdir()
            (tmp / "dcp" / ".metadata").write_bytes(b"old")
        else:
            (tmp / "generator.safetensors").write_bytes(b"old")
        torch.save({"step": 2, "method": "dmd"}, tmp / "trainer_state.pt")
        torch.save({}, tmp / "rng_rank0.pt")

    meta = {"step": 2, "method": "dmd", **({"format": "dcp"} if sharded else {})}
    return save_checkpoint(checkpoint_dir(root, 2), write, meta)


@pytest.mark.parametrize("sharded", [False, True])
def test_an_older_checkpoint_format_is_refused_naming_the_version(wan_path, tmp_path, sharded):
    from fastwan.train.trainer import resolve_resume

    old = _v1_checkpoint(tmp_path / "run", sharded=sharded)
    want = r"checkpoint .*checkpoint-2' has checkpoint format version 1 .*reads version 2"
    fix = "with the fastwan that wrote it"
    for resume in (str(old), "latest"):  # named, or the newest under the output dir
        with pytest.raises(ValueError, match=want) as err:
            resolve_resume(resume, tmp_path / "run")
        assert fix in str(err.value)
    recipe = tiny_recipe(tmp_path / "run", steps=STEPS)
    trainer = Trainer(dmd_method(wan_path, recipe), recipe, rank_loader(0, 1))
    with pytest.raises(ValueError, match=want):
        trainer.resume(old)
    assert trainer.step == 0
    assert _export([str(old), "--out", str(tmp_path / "x"), "--model", str(wan_path)]) == 2
    # a newer format than this fastwan's
    import json

    marker = json.loads((old / COMPLETE_MARKER).read_text())
    (old / COMPLETE_MARKER).write_text(json.dumps({**marker, "version": 99}))
    with pytest.raises(ValueError, match="format version 99, newer than this fastwan's 2"):
        read_trainer_state(old)
