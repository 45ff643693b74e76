"""LoRA training (recipe section ``lora``) on the tiny Wan of ``tests/test_trainer.py``.

``dmd`` with ``lora.shared_base``: one module is the teacher (adapters off, dense), the
student (adapter ``generator``, VSA) and the critic (adapter ``critic``, dense); only the
adapters (and the student's gates) train; the teacher stays the teacher. Training resumes
bitwise; activation checkpointing recomputes the trained role's forward (not the role that
ran last); validation sees the student; the checkpoint holds the adapters only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM
from test_trainer import _loader, _negative, _recipe

from fastwan.config import ConfigError, LoRAConfig, ModelConfig, Recipe, recipe_from_dict
from fastwan.distributed.activation_checkpoint import apply_activation_checkpointing
from fastwan.methods.dmd import DMDMethod
from fastwan.methods.flow import FlowMethod
from fastwan.models import get_attention, load_transformer, set_attention
from fastwan.models.lora import adapter_names, lora_layers
from fastwan.train.checkpoint import DCP_DIR
from fastwan.train.trainer import Trainer

LATENT = (16, 2, 8, 8)


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    from _tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=2)


def _lora_recipe(out, *, steps=4, gates="lora", shared=True, **train):
    recipe = _recipe("dmd", out, steps=steps, **train)
    recipe.lora = LoRAConfig(rank=4, gates=gates, shared_base=shared)
    return recipe


def _method(wan_path, recipe, **kw) -> DMDMethod:
    return DMDMethod(
        load_transformer(wan_path),
        recipe.dmd,
        recipe.vsa,
        _negative(),
        lora=recipe.lora,
        seed=recipe.train.seed,
        **kw,
    )


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *LATENT, generator=g)  # [1, C, T, H, W]
    t = torch.tensor([600.0])  # [1]
    cond = torch.randn(1, MAX_TEXT_LEN, TEXT_DIM, generator=g)  # [1, L, dim]
    return x, t, cond


def _velocity(net, x, t, cond):
    with torch.no_grad():
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]


def _base_weights(net) -> dict[str, torch.Tensor]:
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in net.named_parameters()
        if "lora_" not in n and "to_gate_compress" not in n
    }


def test_one_base_in_three_roles(wan_path, tmp_path):
    recipe = _lora_recipe(tmp_path)
    m = _method(wan_path, recipe)
    assert m.student is m.critic is m.teacher  # one copy of the weights
    assert m.frozen_networks() == {}  # the teacher is the roles' shared base
    assert adapter_names(m.teacher) == ["generator", "critic"]
    gen, crit = m.trained_parameters("generator"), m.trained_parameters("critic")
    assert gen and crit and not set(gen) & set(crit)
    assert all(".generator." in n for n in gen) and all(".critic." in n for n in crit)
    assert any("to_gate_compress.lora_A.generator" in n for n in gen)  # gates: lora
    assert not any("to_gate_compress" in n for n in crit)
    trainable = {n for n, p in m.teacher.named_parameters() if p.requires_grad}
    assert trainable == set(gen) | set(crit)

    dense, sparse = load_transformer(wan_path), load_transformer(wan_path)
    set_attention(sparse, "vsa", sparsity=0.5, tile_size=(1, 2, 2), backend="torch")
    x, t, cond = _inputs()
    # B = 0: every role starts as its base (the student with VSA, zero gates)
    with torch.no_grad():
        v = {name: m._call(name, x, t, cond) for name in ("teacher", "critic", "student")}
    assert torch.equal(v["teacher"], _velocity(dense, x, t, cond))
    assert torch.equal(v["critic"], v["teacher"])
    assert torch.allclose(v["student"], _velocity(sparse, x, t, cond), atol=1e-6)
    assert not torch.allclose(v["student"], v["teacher"], atol=1e-4)  # VSA really skips

    # move each adapter: only its role changes
    with torch.no_grad():
        for p in m.trained_parameters("generator").values():
            p.add_(0.05)
        s1 = m._call("student", x, t, cond)
        assert torch.equal(m._call("teacher", x, t, cond), v["teacher"])
        assert torch.equal(m._call("critic", x, t, cond), v["critic"])
        for p in m.trained_parameters("critic").values():
            p.add_(0.05)
        assert torch.equal(m._call("teacher", x, t, cond), v["teacher"])
        assert torch.equal(m._call("student", x, t, cond), s1)
        assert not torch.allclose(m._call("critic", x, t, cond), v["critic"], atol=1e-5)
    assert get_attention(m.student)["mode"] == "dense"  # the critic ran last
    m.prepare("generator")
    assert get_attention(m.student)["mode"] == "vsa"


def test_training_moves_only_the_adapters_and_resumes_bitwise(wan_path, tmp_path):
    steps = 4
    recipe = _lora_recipe(tmp_path / "full", steps=steps, ema_decay=0.9)
    m = _method(wan_path, recipe)
    base0 = _base_weights(m.teacher)
    gen0 = {n: p.detach().clone() for n, p in m.trained_parameters("generator").items()}
    whole = Trainer(m, recipe, _loader(), log_fn=lambda _l: None)
    assert set(whole.ema.shadow) == set(m.trained_parameters("generator"))  # the adapter's EMA
    whole.train(2)
    ckpt = whole.save_checkpoint()
    whole.train(steps - 2)
    # the base (= the teacher) did not move; the adapters did
    assert all(torch.equal(v, base0[n]) for n, v in _base_weights(m.teacher).items())
    moved = m.trained_parameters("generator")
    assert max((moved[n] - gen0[n]).abs().max() for n in gen0) > 1e-4
    # the optimizers hold states for the adapters (and gates) only
    for role, opt in whole.optimizers.items():
        params = {id(p) for p in m.trained_parameters(role).values()}
        assert {id(p) for p in opt.state} <= params and len(opt.state) > 0
    # the checkpoint holds no base weights
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(ckpt / DCP_DIR).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    assert {k.split(".", 2)[1] for k in model_keys} == {"generator", "critic"}

    again = _lora_recipe(tmp_path / "full", steps=steps, ema_decay=0.9)
    m2 = _method(wan_path, again)
    resumed = Trainer(m2, again, _loader(), log_fn=lambda _l: None)
    assert resumed.resume(ckpt) == ckpt and resumed.step == 2
    resumed.train(steps - 2)
    strip = [{k: v for k, v in r.items() if k != "step_time"} for r in whole.history]
    assert [{k: v for k, v in r.items() if k != "step_time"} for r in resumed.history] == strip
    for role in ("generator", "critic"):
        a, b = m.trained_parameters(role), m2.trained_parameters(role)
        assert all(torch.equal(a[n], b[n]) for n in a), role
    assert all(torch.equal(whole.ema.shadow[n], resumed.ema.shadow[n]) for n in whole.ema.shadow)


def test_activation_checkpointing_recomputes_the_trained_role(wan_path, tmp_path):
    # the generator's loss calls the student, then the teacher and the critic on the same
    # module; backward must recompute the student's forward, not the critic's
    recipe = _lora_recipe(tmp_path, steps=2, interval=1)
    plain = Trainer(_method(wan_path, recipe), recipe, _loader(), log_fn=lambda _l: None)
    plain.train(2)
    m = _method(wan_path, recipe)
    apply_activation_checkpointing(m.student, "full")
    ckpt = Trainer(m, recipe, _loader(), log_fn=lambda _l: None)
    ckpt.train(2)
    for a, b in zip(plain.history, ckpt.history):
        for key in ("generator_loss", "generator_grad_norm", "critic_loss", "critic_grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key


def test_full_gates_train_the_gate_weights(wan_path, tmp_path):
    recipe = _lora_recipe(tmp_path, steps=3, gates="full", interval=1)
    m = _method(wan_path, recipe)
    gen = m.trained_parameters("generator")
    gates = [n for n in gen if "to_gate_compress" in n]
    assert gates == [f"blocks.{i}.to_gate_compress.{w}" for i in (0, 1) for w in ("weight", "bias")]
    trainer = Trainer(m, recipe, _loader(), log_fn=lambda _l: None)
    trainer.train(3)
    assert any(gen[n].detach().abs().max() > 0 for n in gates)  # zero-initialised, now trained


def test_separate_base_gives_the_critic_its_own(wan_path, tmp_path):
    recipe = _lora_recipe(tmp_path, steps=2, shared=False)
    m = _method(wan_path, recipe)
    assert m.student is m.teacher and m.critic is not m.teacher
    assert adapter_names(m.teacher) == ["generator"] and adapter_names(m.critic) == ["critic"]
    assert all(not p.requires_grad for n, p in m.critic.named_parameters() if "lora_" not in n)
    trainer = Trainer(m, recipe, _loader(), log_fn=lambda _l: None)
    trainer.train(2)
    with pytest.raises(ValueError, match="shared_base"):
        DMDMethod(
            load_transformer(wan_path),
            recipe.dmd,
            recipe.vsa,
            _negative(),
            critic=load_transformer(wan_path),
            lora=LoRAConfig(rank=4),
        )


class _RecordingValidator:
    def __init__(self):
        self.seen = []

    def __call__(self, trainer):
        net = trainer.networks["generator"]
        layer = next(layer for _, layer in lora_layers(net))
        self.seen.append((get_attention(net)["mode"], list(layer.active_adapters)))
        return None


def test_validation_runs_the_student(wan_path, tmp_path):
    recipe = _lora_recipe(tmp_path, steps=2, validation_interval=1, ema_decay=0.9)
    validator = _RecordingValidator()
    trainer = Trainer(
        _method(wan_path, recipe), recipe, _loader(), log_fn=lambda _l: None, validator=validator
    )
    trainer.train(2)  # each step ends with the critic's update
    assert validator.seen == [("vsa", ["generator"])] * 2


def test_flow_lora_trains_the_adapter_on_a_frozen_model(wan_path, tmp_path):
    recipe = _recipe("flow", tmp_path, steps=3)
    recipe.vsa.decay_rate, recipe.vsa.decay_interval = 0.25, 1  # the sparsity ramp
    recipe.lora = LoRAConfig(rank=2, gates="full")
    model = load_transformer(wan_path)
    base0 = _base_weights(model)
    m = FlowMethod(model, recipe.vsa, flow_shift=3.0, lora=recipe.lora, seed=1)
    names = set(m.trained_parameters("generator"))
    assert names and all(".generator." in n or "to_gate_compress" in n for n in names)
    trainer = Trainer(m, recipe, _loader(), log_fn=lambda _l: None)
    trainer.train(3)
    assert [r["sparsity"] for r in trainer.history] == [0.0, 0.25, 0.5]
    assert all(torch.equal(v, base0[n]) for n, v in _base_weights(model).items())
    assert all(torch.isfinite(torch.tensor(r["generator_loss"])) for r in trainer.history)


def test_seeded_initialisation_is_the_same_for_every_copy(wan_path, tmp_path):
    recipe = _lora_recipe(tmp_path)
    a, b = _method(wan_path, recipe), _method(wan_path, copy.deepcopy(recipe))
    pa, pb = a.trained_parameters("generator"), b.trained_parameters("generator")
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    a_weights = [p for n, p in pa.items() if "lora_A" in n]
    assert all(p.abs().max() > 0 for p in a_weights)  # A random, B zero
    assert all(p.abs().max() == 0 for n, p in pa.items() if "lora_B" in n)
    teacher = load_transformer(wan_path)
    state = torch.random.get_rng_state()
    DMDMethod(teacher, recipe.dmd, recipe.vsa, _negative(), lora=recipe.lora, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG untouched


def test_recipe_checks():
    base = {"model": {"teacher": "x"}}
    assert Recipe(model=ModelConfig(teacher="x")).lora.enabled is False
    for section, error in (
        ({"lora": {"rank": 4}, "model": {"teacher": "x", "critic": "y"}}, "model.critic"),
        ({"lora": {"rank": 4, "target_modules": []}}, "lora.target_modules"),
        ({"lora": {"rank": 4, "target_modules": ["to_gate_compress"]}}, "lora.gates"),
        ({"lora": {"rank": 4, "gates": "half"}}, "lora.gates"),
        ({"lora": {"rank": 4, "alpha": 0}}, "lora.alpha"),
        ({"lora": {"rank": 4, "dropout": 1.0}}, "lora.dropout"),
    ):
        with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
            recipe_from_dict({**base, **section})
    ok = recipe_from_dict(
        {"model": {"teacher": "x", "critic": "y"}, "lora": {"rank": 4, "shared_base": False}}
    )
    assert ok.lora.scale_alpha == 4.0


def _cli(args: list[str]) -> int:
    import fastwan.cli as cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ["fastwan.commands.train"]
    try:
        return cli.main(args)
    finally:
        cli.COMMAND_MODULES = saved


@pytest.mark.parametrize("command", ["distill", "finetune"])
def test_recipe_with_a_lora_section_trains_from_the_command_line(
    wan_path, tmp_path, capsys, command
):
    import torch.distributed.checkpoint as dcp
    from _tiny_wan import write_random_video_shard

    (tmp_path / "data").mkdir()
    data = write_random_video_shard(tmp_path / "data", n=4)
    out = tmp_path / "run"
    method = "dmd" if command == "distill" else "flow"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
model: {{teacher: {wan_path}, dtype: fp32, teacher_dtype: fp32}}
train: {{method: {method}, max_steps: 2, global_batch_size: 1, mixed_precision: fp32,
         seed: 3, log_interval: 1, checkpoint_interval: 0, report_to: [], output_dir: {out}}}
data: {{path: {data}, num_workers: 0, text_length: 16, num_frames: 5, height: 64, width: 64}}
optim: {{generator: {{lr: 1.0e-3}}, critic: {{lr: 1.0e-3}}}}
dmd: {{generator_update_interval: 1, guidance_scale: 3.0, flow_shift: 3.0}}
vsa: {{sparsity: 0.5, tile_size: [1, 2, 2], backend: torch}}
lora: {{rank: 2, gates: full}}
""")
    rc = _cli([command, str(recipe), "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert "done: 2 steps" in printed.out
    ckpt = out / "checkpoint-2"
    keys = dcp.FileSystemReader(ckpt / DCP_DIR).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    roles = {"generator", "critic"} if method == "dmd" else {"generator"}
    assert {k.split(".", 2)[1] for k in model_keys} == roles
    assert all(".lora_" in k or "to_gate_compress" in k for k in model_keys)
    assert any(k.startswith("model.generator.blocks.0.to_gate_compress.") for k in model_keys)
    # a changed lora section is refused on resume, naming the field
    rc = _cli([command, str(recipe), "--resume", "latest", "--device", "cpu",
               "--train.max_steps=3", "--lora.rank=4"])  # fmt: skip
    assert rc != 0 and "lora.rank" in capsys.readouterr().err
