"""The dmd / flow methods and the Trainer on a tiny Wan (fp32, CPU).

The "dataset" is random latents ``[16, 2, 8, 8]`` and random text embeddings, served by
fastwan's own resumable loader. The student runs VSA with tile (1, 2, 2) on the token grid
(2, 4, 4) = 8 tiles, so sparsity 0.5 really skips tiles.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, RandomSamples, build_tiny_wan, collate_tensors

from fastwan.config import (
    DMDConfig,
    ModelConfig,
    OptimConfig,
    OptimConfigs,
    Recipe,
    TrainConfig,
    VSAConfig,
)
from fastwan.data.sampler import DistributedSampler, ResumableLoader
from fastwan.methods.dmd import DMDMethod
from fastwan.methods.flow import FlowMethod
from fastwan.models import get_attention, load_transformer
from fastwan.train.checkpoint import read_marker
from fastwan.train.trainer import Trainer

LATENT = (16, 2, 8, 8)  # C, T, H, W: token grid (2, 4, 4)
TILE = (1, 2, 2)


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=2)


def _teacher(wan_path):
    return load_transformer(wan_path)


def _RandomSamples(n: int, seed: int = 0) -> RandomSamples:
    return RandomSamples(n, seed, latent=LATENT)


_collate = collate_tensors


def _loader(n: int = 6, micro: int = 1) -> ResumableLoader:
    ds = _RandomSamples(n)
    return ResumableLoader(
        ds, DistributedSampler(len(ds), batch_size=micro, seed=3), collate_fn=_collate
    )


def _vsa(**kw) -> VSAConfig:
    return VSAConfig(sparsity=0.5, tile_size=TILE, backend="torch", **kw)


def _recipe(
    method, out, *, steps, interval=2, accum=1, micro=1, lr=1e-3, vsa=None, **train
) -> Recipe:
    return Recipe(
        model=ModelConfig(teacher="tiny"),
        train=TrainConfig(
            **{
                "method": method,
                "max_steps": steps,
                "global_batch_size": micro * accum,
                "micro_batch_size": micro,
                "gradient_accumulation_steps": accum,
                "mixed_precision": "fp32",
                "seed": 7,
                "log_interval": 1,
                "checkpoint_interval": 0,
                "output_dir": str(out),
                **train,
            }
        ),
        optim=OptimConfigs(
            generator=OptimConfig(lr=lr, schedule="cosine", warmup_steps=1, grad_clip=1.0),
            critic=OptimConfig(lr=2 * lr, betas=(0.0, 0.99), grad_clip=0.5),
        ),
        dmd=DMDConfig(generator_update_interval=interval, flow_shift=3.0, guidance_scale=3.0),
        vsa=vsa if vsa is not None else _vsa(),
    )


def _negative():
    return torch.randn(MAX_TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(11))


def _dmd(wan_path, recipe: Recipe) -> DMDMethod:
    return DMDMethod(_teacher(wan_path), recipe.dmd, recipe.vsa, _negative())


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dmd_roles_and_attention(wan_path, tmp_path):
    recipe = _recipe("dmd", tmp_path, steps=2)
    method = _dmd(wan_path, recipe)
    assert get_attention(method.student)["mode"] == "vsa"
    assert get_attention(method.student)["sparsity"] == 0.5
    assert get_attention(method.teacher)["mode"] == "dense"
    assert get_attention(method.critic)["mode"] == "dense"
    assert not method.teacher.training
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert all(p.requires_grad for p in method.student.parameters())
    assert all(p.requires_grad for p in method.critic.parameters())
    ids = {id(p) for p in method.teacher.parameters()}
    assert not ids & {id(p) for p in method.student.parameters()}
    assert not ids & {id(p) for p in method.critic.parameters()}
    assert set(method.networks()) == {"generator", "critic"}
    # separately loaded student / critic are used as given
    student, critic = _teacher(wan_path), _teacher(wan_path)
    given = DMDMethod(
        _teacher(wan_path), recipe.dmd, recipe.vsa, _negative(), student=student, critic=critic
    )
    assert given.student is student and given.critic is critic
    assert get_attention(student)["mode"] == "vsa" and get_attention(critic)["mode"] == "dense"
    with pytest.raises(ValueError, match="distinct"):
        DMDMethod(student, recipe.dmd, recipe.vsa, _negative(), student=student)
    with pytest.raises(ValueError, match="critic must be a torch.nn.Module"):
        DMDMethod(student, recipe.dmd, recipe.vsa, _negative(), critic="critic")


def test_dmd_update_pattern(wan_path, tmp_path):
    interval = 3
    recipe = _recipe("dmd", tmp_path, steps=6, interval=interval, accum=2)
    method = _dmd(wan_path, recipe)
    lines: list[str] = []
    trainer = Trainer(method, recipe, _loader(), log_fn=lines.append)
    teacher0 = _snapshot(method.teacher)
    for i in range(6):
        gen_before, critic_before = _snapshot(method.student), _snapshot(method.critic)
        record = trainer.train_step()
        assert record["step"] == i + 1
        assert _same(_snapshot(method.teacher), teacher0), "the teacher must never change"
        assert not _same(_snapshot(method.critic), critic_before), f"critic frozen at {i}"
        gen_changed = not _same(_snapshot(method.student), gen_before)
        assert gen_changed == (i % interval == 0), f"generator update pattern wrong at {i}"
        assert record["generator_updated"] == (i % interval == 0)
        assert record["critic_updated"]
        assert ("generator_loss" in record) == (i % interval == 0)
        for key in ("critic_loss", "critic_grad_norm", "generator_loss", "generator_grad_norm"):
            if key in record:
                assert torch.isfinite(torch.tensor(record[key])), (key, record)
        assert get_attention(method.student)["mode"] == "vsa"
        assert get_attention(method.teacher)["mode"] == "dense"
        assert get_attention(method.critic)["mode"] == "dense"
    assert all(p.grad is None for p in method.teacher.parameters())
    assert len(trainer.history) == 6 and len(lines) == 6
    assert "critic_loss" in lines[0] and "generator_loss" in lines[0]
    # the generator's schedule steps with its own updates (2 of them), the critic's with 6
    assert trainer.schedulers["generator"].last_epoch == 2
    assert trainer.schedulers["critic"].last_epoch == 6
    # critic grad-norm clipping: the logged norm is the pre-clip one, updates still happen
    assert trainer.optimizers["critic"].param_groups[0]["betas"] == (0.0, 0.99)


def _run(make_method, recipe, data, *, steps, resume=False):
    method = make_method(recipe)
    trainer = Trainer(method, recipe, data, log_fn=lambda _line: None)
    if resume:
        assert trainer.resume() is not None
    trainer.train(steps)
    return trainer


def _losses(history):
    return [{k: v for k, v in r.items() if k != "step_time"} for r in history]


@pytest.mark.parametrize("kind", ["dmd", "flow"])
def test_resume_equals_uninterrupted(wan_path, tmp_path, kind):
    k = 3
    vsa = _vsa(decay_rate=0.25, decay_interval=2) if kind == "flow" else _vsa()

    def make(recipe):
        if kind == "dmd":
            return _dmd(wan_path, recipe)
        return FlowMethod(_teacher(wan_path), recipe.vsa, flow_shift=3.0)

    ema = {"ema_decay": 0.9, "ema_start_step": 1}
    full_recipe = _recipe(kind, tmp_path / "full", steps=2 * k, accum=2, vsa=vsa, **ema)
    full = _run(make, full_recipe, _loader(n=5), steps=2 * k)

    half_recipe = _recipe(kind, tmp_path / "half", steps=2 * k, accum=2, vsa=vsa, **ema)
    first = _run(make, half_recipe, _loader(n=5), steps=k)
    ckpt = first.save_checkpoint()
    assert ckpt.name == f"checkpoint-{k}"
    # fresh method, loader and trainer; resume from the latest checkpoint in output_dir
    second = _run(make, half_recipe, _loader(n=5), steps=k, resume=True)
    assert second.step == 2 * k
    assert _losses(second.history) == _losses(full.history)
    for role, net in full.networks.items():
        assert _same(_snapshot(net), _snapshot(second.networks[role])), role
    assert full.ema.num_updates == second.ema.num_updates > 0
    assert _same(full.ema.shadow, second.ema.shadow)
    if kind == "flow":  # the sparsity schedule ramped 0 -> 0.25 -> 0.5 across the resume
        assert [r["sparsity"] for r in full.history] == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5]
        assert get_attention(second.method.model)["sparsity"] == 0.5
    # a different seed gives different losses: the comparison above can fail
    other = _recipe(kind, tmp_path / "other", steps=2 * k, accum=2, vsa=vsa, **ema)
    other.train.seed = 8
    diff = _run(make, other, _loader(n=5), steps=1)
    assert _losses(diff.history)[0] != _losses(full.history)[0]


def test_flow_reduces_loss_on_fixed_batch(wan_path, tmp_path):
    recipe = _recipe("flow", tmp_path, steps=150, lr=1e-2, vsa=VSAConfig(enabled=False))
    method = FlowMethod(_teacher(wan_path), recipe.vsa, flow_shift=1.0)
    assert get_attention(method.model)["mode"] == "dense"
    batch = _collate([_RandomSamples(2, seed=5)[i] for i in range(2)])

    def eval_loss() -> float:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(method.loss("generator", batch, g)[0]) for _ in range(8)) / 8

    before = eval_loss()
    Trainer(method, recipe, [batch], log_fn=lambda _line: None).train()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_flow_vsa_follows_sparsity_schedule(wan_path):
    method = FlowMethod(_teacher(wan_path), _vsa(decay_rate=0.2, decay_interval=1))
    assert get_attention(method.model) == {
        "mode": "vsa",
        "sparsity": 0.0,
        "tile_size": TILE,
        "backend": "torch",
    }
    method.set_step(2)
    assert get_attention(method.model)["sparsity"] == pytest.approx(0.4)
    method.set_step(10)
    assert get_attention(method.model)["sparsity"] == 0.5


def test_method_device_is_the_compute_device_under_cpu_offload(wan_path):
    # FSDP CPU offload keeps parameters on the CPU: the method must still compute (and draw
    # noise) on the device parallelize_method sets, not where the parameters live.
    method = FlowMethod(_teacher(wan_path), _vsa())
    assert method.device == torch.device("cpu")
    method.compute_device = torch.device("meta")
    assert method.device == torch.device("meta")


def test_simulate_rollout_on_text_only_batches(wan_path, tmp_path):
    recipe = _recipe("dmd", tmp_path, steps=2)
    recipe.dmd.rollout = "simulate"
    batch = _collate([_RandomSamples(2)[i] for i in range(2)])
    del batch["latents"]
    method = DMDMethod(_teacher(wan_path), recipe.dmd, recipe.vsa, _negative(), latent_shape=LATENT)
    g = torch.Generator().manual_seed(0)
    for step in (method.critic_step, method.generator_step, method.generator_step):
        loss, info = step(batch, g)
        assert torch.isfinite(loss) and info["rollout_timestep"] in (1000.0, 757.0, 522.0)
    loss.backward()
    assert any(p.grad is not None for p in method.student.parameters())
    no_shape = DMDMethod(_teacher(wan_path), recipe.dmd, recipe.vsa, _negative())
    with pytest.raises(ValueError, match="latent_shape"):
        no_shape.critic_step(batch, g)


def test_generator_step_grads_only_the_student(wan_path, tmp_path):
    method = _dmd(wan_path, _recipe("dmd", tmp_path, steps=1))
    batch = _collate([_RandomSamples(2)[i] for i in range(2)])
    loss, _ = method.generator_step(batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert all(p.grad is None for p in method.critic.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    loss, _ = method.critic_step(batch, torch.Generator().manual_seed(1))
    method.student.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in method.student.parameters())
    assert any(p.grad is not None for p in method.critic.parameters())


def test_same_rng_seed_same_loss(wan_path, tmp_path):
    method = _dmd(wan_path, _recipe("dmd", tmp_path, steps=1))
    batch = _collate([_RandomSamples(2)[i] for i in range(2)])
    a = method.generator_step(batch, torch.Generator().manual_seed(4))[0]
    b = method.generator_step(batch, torch.Generator().manual_seed(4))[0]
    c = method.generator_step(batch, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_inputs_raise_value_errors(wan_path, tmp_path):
    recipe = _recipe("dmd", tmp_path, steps=2)
    method = _dmd(wan_path, recipe)
    with pytest.raises(ValueError, match="train.method"):
        Trainer(method, _recipe("flow", tmp_path, steps=2), _loader())
    with pytest.raises(ValueError, match="negative_embedding"):
        DMDMethod(_teacher(wan_path), recipe.dmd, recipe.vsa, torch.zeros(2, 3, 4, 5))
    batch = _collate([_RandomSamples(1)[0]])
    with pytest.raises(ValueError, match="rng must be a torch.Generator"):
        method.critic_step(batch, 0)
    with pytest.raises(ValueError, match="roles"):
        method.loss("teacher", batch, torch.Generator())
    with pytest.raises(ValueError, match="latents"):
        method.critic_step({k: v for k, v in batch.items() if k != "latents"}, torch.Generator())
    with pytest.raises(ValueError, match="text_embedding"):
        method.generator_step({"latents": batch["latents"]}, torch.Generator())
    trainer = Trainer(method, recipe, _loader(), log_fn=lambda _line: None)
    with pytest.raises(ValueError, match="max_steps"):
        trainer.train(3)
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        trainer.resume(tmp_path)
    flow = FlowMethod(copy.deepcopy(method.teacher), VSAConfig(enabled=False))
    flow_trainer = Trainer(flow, _recipe("flow", tmp_path / "f", steps=1), _loader())
    flow_trainer.train()
    with pytest.raises(ValueError, match=r"train\.method: cannot change.*--train\.method=flow"):
        trainer.resume(flow_trainer.save_checkpoint())


def test_ema_tracks_generator_updates(wan_path, tmp_path):
    recipe = _recipe(
        "flow", tmp_path, steps=4, vsa=VSAConfig(enabled=False), ema_decay=0.5, ema_start_step=2
    )
    method = FlowMethod(_teacher(wan_path), recipe.vsa)
    trainer = Trainer(method, recipe, _loader(), log_fn=lambda _line: None)
    expected = None
    for i in range(4):
        trainer.train_step()
        live = {n: p.detach().clone() for n, p in method.model.named_parameters()}
        if i < 2:  # before ema_start_step the average restarts at the live weights
            expected = live
        else:
            expected = {n: 0.5 * expected[n] + 0.5 * live[n] for n in live}
        for name, value in expected.items():
            torch.testing.assert_close(trainer.ema.shadow[name], value, rtol=0, atol=1e-6)
    assert trainer.ema.num_updates == 2
    assert not _same(trainer.ema.shadow, dict(method.model.named_parameters()))


def test_periodic_checkpoints_are_pruned(wan_path, tmp_path):
    recipe = _recipe("dmd", tmp_path, steps=6, checkpoint_interval=2, checkpoints_total_limit=1)
    trainer = Trainer(_dmd(wan_path, recipe), recipe, _loader(), log_fn=lambda _line: None)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (tmp_path / "loss_curves.png").is_file()  # plotted after the last step
    files = {p.name for p in (tmp_path / "checkpoint-6").iterdir()}
    assert files == {"dcp", "recipe.yaml", "checksums.json", "COMPLETE"}  # DCP holds it all
    assert read_marker(tmp_path / "checkpoint-6")["networks"] == ["critic", "generator"]
    # the generator's cosine LR (warmup 1, 3 updates) steps with its own updates only
    lrs = [r["generator_lr"] for r in trainer.history if r["generator_updated"]]
    assert lrs == [pytest.approx(1e-3), pytest.approx(1e-3), pytest.approx(5e-4)]
    assert [r["critic_lr"] for r in trainer.history] == [pytest.approx(2e-3)] * 6


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bf16_autocast_runs(wan_path, tmp_path):
    recipe = _recipe("dmd", tmp_path, steps=1, mixed_precision="bf16")
    records = Trainer(_dmd(wan_path, recipe), recipe, _loader(), log_fn=lambda _l: None).train()
    fp32 = _recipe("dmd", tmp_path, steps=1)
    ref = Trainer(_dmd(wan_path, fp32), fp32, _loader(), log_fn=lambda _l: None).train()
    assert torch.isfinite(torch.tensor(records[0]["critic_loss"]))
    assert records[0]["critic_loss"] != ref[0]["critic_loss"]
    assert records[0]["critic_loss"] == pytest.approx(ref[0]["critic_loss"], rel=0.1)


def test_teacher_cfg_uses_negative_prompt_and_mask_hides_padding(wan_path, tmp_path):
    batch = _collate([_RandomSamples(2)[i] for i in range(2)])

    def loss(guidance: float, negative: torch.Tensor, b=batch) -> torch.Tensor:
        recipe = _recipe("dmd", tmp_path, steps=1)
        recipe.dmd.guidance_scale = guidance
        method = DMDMethod(_teacher(wan_path), recipe.dmd, recipe.vsa, negative)
        return method.generator_step(b, torch.Generator().manual_seed(9))[0]

    neg, other_neg = _negative(), torch.zeros(MAX_TEXT_LEN, TEXT_DIM)
    # w = 1: the teacher's conditional prediction alone; the negative prompt is unused
    assert torch.equal(loss(1.0, neg), loss(1.0, other_neg))
    # w = 3: uncond + 3 (cond - uncond) depends on the negative prompt
    assert not torch.equal(loss(3.0, neg), loss(3.0, other_neg))
    # padding (text_mask false) is zeroed: changing it changes nothing, a token does
    padded = dict(batch, text_embedding=batch["text_embedding"].clone())
    padded["text_embedding"][~batch["text_mask"]] = 100.0
    assert torch.equal(loss(3.0, neg, padded), loss(3.0, neg))
    token = dict(batch, text_embedding=batch["text_embedding"].clone())
    token["text_embedding"][:, 0] += 1.0
    assert not torch.equal(loss(3.0, neg, token), loss(3.0, neg))


def test_teacher_cfg_pads_a_short_negative_as_the_pipeline_does(wan_path, tmp_path):
    """The recipe path hands DMD the negative prompt's valid tokens only; the teacher's
    uncond branch must see them zero-padded to the batch's text length, as the pipeline
    and the data pad every prompt (Wan's cross-attention has no mask: an unpadded context
    is another prompt)."""
    batch = _collate([_RandomSamples(2)[i] for i in range(2)])
    n = 3
    short = _negative()[:n]  # [n, dim]
    padded = torch.cat([short, torch.zeros(MAX_TEXT_LEN - n, TEXT_DIM)])  # [L, dim]

    def loss(negative: torch.Tensor) -> torch.Tensor:
        recipe = _recipe("dmd", tmp_path, steps=1)  # guidance 3
        method = DMDMethod(_teacher(wan_path), recipe.dmd, recipe.vsa, negative)
        return method.generator_step(batch, torch.Generator().manual_seed(9))[0]

    torch.testing.assert_close(loss(short), loss(padded), rtol=1e-6, atol=1e-8)
    # the padding matters to the network, so the check above can fail
    teacher = _teacher(wan_path)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        v_short, v_padded = (
            teacher(hidden_states=x, timestep=t, encoder_hidden_states=e[None])[0]
            for e in (short, padded)
        )
    assert not torch.allclose(v_short, v_padded, atol=1e-4)
    # a negative longer than the text length is refused, naming the fix
    too_long = torch.randn(MAX_TEXT_LEN + 1, TEXT_DIM)
    with pytest.raises(ValueError, match="data.text_length"):
        loss(too_long)


def test_dmd_losses_match_hand_computation(wan_path, tmp_path):
    """generator_step / critic_step against the DMD formulas written out with raw
    diffusers calls and the same draws from the generator (rollout index, noise, s, noise)."""
    recipe = _recipe("dmd", tmp_path, steps=1)  # guidance 3, shift 3, range [0.02, 0.98]
    method = _dmd(wan_path, recipe)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # make the three networks differ (they start as copies)
        for net in (method.student, method.critic):
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = _collate([_RandomSamples(2)[i] for i in range(2)])
    cond = batch["text_embedding"] * batch["text_mask"][..., None]  # [B, L, dim]
    neg = _negative()[None].expand(2, -1, -1)  # [B, L, dim]
    lat = batch["latents"]  # [B, C, T, H, W]

    def run(net, x, t, text):
        t = torch.as_tensor(t, dtype=torch.float32).expand(2)  # [B]
        return net(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def student_x0(g):
        k = int(torch.randint(3, (1,), generator=g))
        s_k = [1000, 757, 522][k] / 1000
        x = (1 - s_k) * lat + s_k * torch.randn(lat.shape, generator=g)
        x0 = x - s_k * run(method.student, x, 1000 * s_k, cond)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        s = (3 * u / (1 + 2 * u)).clamp(0.02, 0.98).float()  # [B]
        eps = torch.randn(lat.shape, generator=g)
        sb = s.view(2, 1, 1, 1, 1)
        return x0, sb, eps, (1 - sb) * x0 + sb * eps, 1000 * s

    with torch.no_grad():
        x0, sb, eps, x_t, t = student_x0(torch.Generator().manual_seed(2))
        real_c = x_t - sb * run(method.teacher, x_t, t, cond)
        real_u = x_t - sb * run(method.teacher, x_t, t, neg)
        real = real_u + 3.0 * (real_c - real_u)
        fake = x_t - sb * run(method.critic, x_t, t, cond)
        norm = (x0 - real).abs().mean(dim=(1, 2, 3, 4)).view(2, 1, 1, 1, 1)
        expected_gen = 0.5 * (((fake - real) / norm) ** 2).mean()
        expected_critic = ((run(method.critic, x_t, t, cond) - (eps - x0)) ** 2).mean()
    gen_loss, _ = method.generator_step(batch, torch.Generator().manual_seed(2))
    critic_loss, _ = method.critic_step(batch, torch.Generator().manual_seed(2))
    torch.testing.assert_close(gen_loss, expected_gen, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(critic_loss, expected_critic, rtol=1e-5, atol=1e-7)


def test_compiled_one_process_training_equals_eager(wan_path, tmp_path):
    """``parallel.compile`` in a one-process run: every block of student, critic and
    teacher is compiled (on top of selective checkpointing) and training gives the eager
    losses and weights."""
    from fastwan.config import ParallelConfig
    from fastwan.distributed.mesh import init_parallel
    from fastwan.distributed.parallelize import parallelize_method

    runs = {}
    for backend in ("none", "aot_eager"):
        recipe = _recipe("dmd", tmp_path / backend, steps=3)
        recipe.parallel = ParallelConfig(activation_checkpointing="selective", compile=backend)
        method = _dmd(wan_path, recipe)
        parallelize_method(method, init_parallel(recipe.parallel, "cpu"), recipe)
        nets = [method.student, method.critic, method.teacher]
        compiled = {
            getattr(b, "_compiled_call_impl", None) is not None for n in nets for b in n.blocks
        }
        assert compiled == {backend != "none"}
        runs[backend] = _run(lambda _r, m=method: m, recipe, _loader(), steps=3)
    eager, comp = runs["none"], runs["aot_eager"]
    for a, b in zip(_losses(comp.history), _losses(eager.history)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # Adam turns gradients that differ in the 1e-9s (reassociation) into update differences
    # near its eps; 3 steps at lr 1e-3 move weights ~3e-3, a wrong gradient by as much.
    for role, net in eager.networks.items():
        want = _snapshot(net)
        for name, got in _snapshot(comp.networks[role]).items():
            torch.testing.assert_close(got, want[name], rtol=0, atol=5e-5)
