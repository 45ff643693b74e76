"""Meta-device builds: a transformer built without its weights, wrapped and sharded, then
materialised with each rank reading only its own shards, equals the fully loaded one.

One process: ``load_transformer(..., device="meta")`` + :func:`materialize` gives exactly
the parameters (values, dtypes, float32 modules of diffusers' ``_keep_in_fp32_modules``),
buffers (the rotary tables) and config of ``load_transformer`` -- with no gates, FastVideo
gates, and half a gate (that block's gate stays zero). Two gloo processes: the DMD networks
(teacher, student and critic copied from it, or each from its own folder and dtype) built
on the meta device and sharded (FSDP2, HSDP, SP + activation checkpointing) hold the same
shards as those loaded in full and then sharded, and compute the same outputs, bit for
bit. A missing weight is still a ValueError naming it, before anything is built.

Also: ``fastwan.models`` imports nothing of ``fastwan.toy`` (names of shipped models are
resolved through ``fastwan.BUNDLED_MODELS`` or a caller's resolver; extra VAE classes are
registered or named by the pipeline's ``model_index.json``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist import spawn, tiny_recipe
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, add_fastvideo_gates, build_tiny_wan

from fastwan.distributed.parallelize import materialize
from fastwan.models.loading import (
    WEIGHTS_NAME,
    load_pending_weights,
    load_transformer,
    load_vae,
    pending_weights,
    register_vae_class,
    resolve_model_path,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_build")
    plain = build_tiny_wan(root / "plain", num_layers=3)
    gated = build_tiny_wan(root / "gated", num_layers=3, seed=1)
    add_fastvideo_gates(gated / "transformer")
    return {"plain": plain, "gated": gated}


def _tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"param {n}": p for n, p in net.named_parameters()}
    out.update({f"buffer {n}": b for n, b in net.named_buffers()})
    return out


def _assert_same_module(got: torch.nn.Module, want: torch.nn.Module) -> None:
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype, (key, a[key].dtype, b[key].dtype)
        assert a[key].device == b[key].device, key
        assert a[key].requires_grad == b[key].requires_grad, key
        assert torch.equal(a[key], b[key]), key
    assert dict(got.config) == dict(want.config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["plain", "gated"])
def test_meta_build_materialises_to_the_loaded_transformer(folders, which, dtype):
    want = load_transformer(folders[which], dtype=dtype, attention="vsa", sparsity=0.5)
    got = load_transformer(
        folders[which], dtype=dtype, attention="vsa", sparsity=0.5, device="meta"
    )
    assert pending_weights(got) is not None
    assert all(p.is_meta for p in got.parameters())
    assert not any(b.is_meta for b in got.buffers())  # rotary tables: real from the start
    assert materialize(got, "cpu")
    assert pending_weights(got) is None and not materialize(got, "cpu")  # done once
    _assert_same_module(got, want)
    if dtype == torch.bfloat16:  # diffusers keeps some modules in float32: so does the build
        assert got.scale_shift_table.dtype == torch.float32
        assert got.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    for block in got.blocks:
        assert block.attn1.processor.__class__ is want.blocks[0].attn1.processor.__class__


def test_the_safetensors_reader_gives_the_same_weights(folders, monkeypatch):
    from fastwan.models import loading

    want = load_transformer(folders["gated"], dtype=torch.bfloat16)
    monkeypatch.setattr(loading._RowReader, "read_into", lambda *_a: False)
    got = load_transformer(folders["gated"], dtype=torch.bfloat16, device="meta")
    materialize(got, "cpu")
    _assert_same_module(got, want)


def test_half_a_gate_stays_zero_and_copies_read_the_same_weights(tmp_path):
    import copy

    from safetensors.torch import load_file, save_file

    path = build_tiny_wan(tmp_path / "w", num_layers=2)
    add_fastvideo_gates(path / "transformer")
    file = path / "transformer" / WEIGHTS_NAME
    state = load_file(file)
    del state["blocks.1.to_gate_compress.bias"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="block 1 lacks to_gate_compress.bias"):
        want = load_transformer(path)
    with pytest.warns(UserWarning, match="block 1 lacks to_gate_compress.bias"):
        meta = load_transformer(path, device="meta")
    twin = copy.deepcopy(meta)  # DMD copies the teacher for the student and the critic
    for net in (meta, twin):
        materialize(net, "cpu")
        _assert_same_module(net, want)
    assert torch.count_nonzero(twin.blocks[1].to_gate_compress.weight) == 0
    assert torch.count_nonzero(twin.blocks[0].to_gate_compress.weight) > 0


def test_missing_or_misshapen_weights_are_named_before_anything_is_built(tmp_path):
    from safetensors.torch import load_file, save_file

    path = build_tiny_wan(tmp_path / "w", num_layers=2)
    file = path / "transformer" / WEIGHTS_NAME
    state = load_file(file)
    save_file({k: v for k, v in state.items() if k != "blocks.1.ffn.net.2.weight"}, file)
    for device in ("meta", None):
        with pytest.raises(ValueError, match=r"lack 1 tensors the model needs: \['blocks.1.ffn"):
            load_transformer(path, device=device)
    state["blocks.1.ffn.net.2.weight"] = state["blocks.1.ffn.net.2.weight"][:, :-1].clone()
    save_file(state, file)
    with pytest.raises(ValueError, match=r"blocks.1.ffn.net.2.weight has shape \(32, 63\)"):
        load_transformer(path, device="meta")


def test_pending_weights_need_materialised_parameters(folders):
    net = load_transformer(folders["plain"], device="meta")
    with pytest.raises(ValueError, match="still on the meta device: move the network"):
        load_pending_weights(net)


# ---------------------------------------------------------------- two gloo processes

LAYOUTS = {
    "fsdp": {"shard": 2},
    "hsdp": {"replicate": 2, "shard": 1},
    "sp": {"shard": 1, "sp": 2, "ac": "selective"},
    "fsdp_ac": {"shard": 2, "ac": "full", "separate": True},
    # shards read through safetensors' slices (the reader for dtypes / layouts the plain
    # row reader does not take)
    "fsdp_slices": {"shard": 2, "slices": True},
}


def _build(cfg: dict, state, recipe, device: str | None):
    from fastwan.distributed.parallelize import parallelize_method
    from fastwan.methods.dmd import DMDMethod

    g = torch.Generator().manual_seed(11)
    negative = torch.randn(MAX_TEXT_LEN, TEXT_DIM, generator=g)
    if cfg.get("separate"):  # each network from its own folder and dtype (DMD's roles)
        teacher = load_transformer(cfg["plain"], dtype=torch.bfloat16, device=device)
        student = load_transformer(cfg["gated"], dtype=torch.float32, device=device)
        critic = load_transformer(cfg["plain"], dtype=torch.float32, device=device)
        method = DMDMethod(
            teacher, recipe.dmd, recipe.vsa, negative, student=student, critic=critic
        )
    else:  # student and critic copied from the teacher
        teacher = load_transformer(cfg["gated"], dtype=torch.float32, device=device)
        method = DMDMethod(teacher, recipe.dmd, recipe.vsa, negative)
    parallelize_method(method, state, recipe)
    return method


def _outputs(net) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dtype = net.blocks[0].attn1.to_q.weight.dtype
    x = torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype)  # [B, C, T, H, W]
    cond = torch.randn(1, MAX_TEXT_LEN, TEXT_DIM, generator=g).to(dtype)  # [B, L, dim]
    with torch.no_grad():
        return net(
            hidden_states=x,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=cond,
            return_dict=False,
        )[0].float()


def meta_worker(cfgs: list[dict]) -> None:
    from torch.distributed.tensor import DTensor

    from fastwan.distributed.mesh import destroy_parallel, init_parallel
    from fastwan.distributed.parallelize import reshard
    from fastwan.models import loading

    try:
        problems: dict[str, list[str]] = {}
        for cfg in cfgs:
            recipe = tiny_recipe(
                cfg["out"],
                steps=1,
                world_size=2,
                replicate=cfg.get("replicate", 1),
                shard=cfg.get("shard", 1),
                sequence_parallel=cfg.get("sp", 1),
                activation_checkpointing=cfg.get("ac", "none"),
            )
            state = init_parallel(recipe.parallel, "cpu")
            want = _build(cfg, state, recipe, None)
            rows = loading._RowReader.read_into
            if cfg.get("slices"):
                loading._RowReader.read_into = lambda *_a: False
            try:
                got = _build(cfg, state, recipe, "meta")
            finally:
                loading._RowReader.read_into = rows
            bad = problems.setdefault(cfg["name"], [])
            for role in ("teacher", "student", "critic"):
                a, b = getattr(got, role), getattr(want, role)
                if pending_weights(a) is not None:
                    bad.append(f"{role}: weights still pending")
                ta, tb = _tensors(a), _tensors(b)
                if ta.keys() != tb.keys():
                    bad.append(f"{role}: names {sorted(ta.keys() ^ tb.keys())}")
                    continue
                for key in tb:
                    x, y = ta[key], tb[key]
                    if isinstance(y, DTensor):
                        if not isinstance(x, DTensor) or x.placements != y.placements:
                            bad.append(f"{role} {key}: placement")
                            continue
                        x, y = x.to_local(), y.to_local()
                    if x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                        bad.append(f"{role} {key}: values")
                # forwards (all ranks, with the same inputs: a collective under FSDP / SP)
                if not torch.equal(_outputs(a), _outputs(b)):
                    bad.append(f"{role}: outputs")
                reshard(a)
                reshard(b)
        if state.is_main:
            Path(cfgs[0]["result"]).write_text(json.dumps(problems))
    finally:
        destroy_parallel()


def test_meta_built_shards_equal_the_loaded_ones_on_two_processes(folders, tmp_path):
    result = tmp_path / "result.json"
    cfgs = [
        {
            "name": name,
            "plain": str(folders["plain"]),
            "gated": str(folders["gated"]),
            "out": str(tmp_path / name),
            "result": str(result),
            **layout,
        }
        for name, layout in LAYOUTS.items()
    ]
    spawn(meta_worker, 2, cfgs)
    problems = json.loads(result.read_text())
    assert set(problems) == set(LAYOUTS)
    assert problems == {name: [] for name in LAYOUTS}


# ------------------------------------------------------- names and VAEs, no toy imports


def test_models_import_nothing_of_the_toy_world(tmp_path):
    for file in sorted((ROOT / "fastwan" / "models").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("fastwan.toy") for n in names), (file.name, names)
    folder = build_tiny_wan(tmp_path / "w", num_layers=1)
    code = (
        "import sys; import fastwan.models, fastwan.models.loading as l; "
        "l.identify_folder(sys.argv[1]); l.load_transformer(sys.argv[1], device='meta'); "
        "l.load_vae(l.resolve_model_path(sys.argv[1]) / 'vae'); "
        "toy = sorted(m for m in sys.modules if m.startswith('fastwan.toy')); "
        "assert not toy, toy"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, cwd=ROOT)


def test_shipped_model_names_resolve_through_the_declared_locators(monkeypatch, tmp_path):
    import fastwan

    teacher = resolve_model_path("toy-teacher")
    assert (teacher / "model_index.json").is_file() and teacher.name == "toy-teacher"
    # a caller's resolver goes first, for any name it knows
    assert (
        resolve_model_path("mine", resolver=lambda n: teacher if n == "mine" else None) == teacher
    )
    with pytest.raises(ValueError, match="model folder 'unknown-name' does not exist"):
        resolve_model_path("unknown-name", resolver=lambda n: None)
    # an install without the toy world: a clear error, no ImportError
    monkeypatch.setattr(fastwan, "BUNDLED_MODELS", ("fastwan.no_such_package:find",))
    with pytest.raises(ValueError, match="ships its weights inside fastwan.*local folder"):
        resolve_model_path("toy-student")


def test_vae_classes_from_the_pipeline_index_a_registry_or_the_caller(tmp_path):
    from fastwan.models import loading

    toy = resolve_model_path("toy-teacher")
    vae = load_vae(toy / "vae")  # model_index.json names fastwan.toy.pixel_vae.ToyPixelVAE
    assert type(vae).__name__ == "ToyPixelVAE"
    # a bare vae/ folder (no model_index.json) of a class nobody registered
    cls = type(vae)
    bare = tmp_path / "vae"
    vae.save_pretrained(bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "_class_name": "RenamedVAE"}))
    assert type(load_vae(bare, classes={"RenamedVAE": cls})) is cls
    assert register_vae_class(cls, "RenamedVAE") is cls
    try:
        assert type(load_vae(bare)) is cls
    finally:
        loading._VAE_CLASSES.pop("RenamedVAE")
