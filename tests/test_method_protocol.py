"""A method written against :class:`fastwan.methods.base.Method` alone trains through the
unmodified Trainer: its own roles, its own update schedule (order included), its own
losses; the trainer's one ``rng`` feeds every loss; each role's LR schedule spans that
role's own updates; resume reproduces an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastwan.config import ModelConfig, OptimConfig, OptimConfigs, Recipe, TrainConfig
from fastwan.methods.base import Method, update_counts
from fastwan.methods.dmd import DMDMethod
from fastwan.methods.flow import FlowMethod
from fastwan.train.trainer import Trainer

DIM = 4


class TwoRoleToy:
    """A regressor ("generator") fitted to ``2 x + noise`` and a "critic" fitted to the
    generator's residuals. The critic steps every step and first; the generator only on
    steps 1, 4, 7, ... after it. Every call is logged (step, role, the rng's draws)."""

    name = "dmd"  # train.method admits dmd / flow; the trainer only compares the names
    roles = ("critic", "generator")
    compute_device = None

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.gen = nn.Linear(DIM, DIM)
        self.crit = nn.Linear(DIM, DIM)
        self.calls: list[tuple[int, str]] = []
        self.rngs: list[torch.Generator] = []
        self.step = -1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def sparsity(self) -> float:
        return 0.25

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.gen, "critic": self.crit}

    def frozen_networks(self) -> dict[str, nn.Module]:
        return {}

    def set_step(self, step: int) -> None:
        self.step = step

    def updates(self, step: int) -> tuple[str, ...]:
        return ("critic", "generator") if step % 3 == 1 else ("critic",)

    def loss(self, role, batch, rng):
        self.calls.append((self.step, role))
        self.rngs.append(rng)
        x = batch["x"]  # [B, DIM]
        target = 2 * x + 0.1 * torch.randn(x.shape, generator=rng)
        if role == "generator":
            loss = ((self.gen(x) - target) ** 2).mean()
            return loss, {"fit": float(loss.detach())}
        with torch.no_grad():
            residual = target - self.gen(x)
        return ((self.crit(x) - residual) ** 2).mean(), {}


def _recipe(out, *, steps: int, accum: int = 2, **train) -> Recipe:
    return Recipe(
        model=ModelConfig(teacher="tiny"),
        train=TrainConfig(
            **{
                "method": "dmd",
                "max_steps": steps,
                "global_batch_size": accum,
                "micro_batch_size": 1,
                "gradient_accumulation_steps": accum,
                "mixed_precision": "fp32",
                "seed": 5,
                "log_interval": 1,
                "checkpoint_interval": 0,
                "report_to": [],
                "output_dir": str(out),
                **train,
            }
        ),
        optim=OptimConfigs(
            generator=OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=0),
            critic=OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=0),
        ),
    )


class _Data:
    """Endless fixed micro-batches ``{"x": [1, DIM]}`` with a resumable position."""

    def __init__(self, n: int = 5):
        g = torch.Generator().manual_seed(1)
        self.items = [{"x": torch.randn(1, DIM, generator=g)} for _ in range(n)]
        self.position = 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.items[(self.position - 1) % len(self.items)]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


def _data() -> _Data:
    return _Data()


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_methods_follow_the_protocol():
    assert isinstance(TwoRoleToy(), Method)
    for cls in (DMDMethod, FlowMethod):
        for member in ("name", "roles", "networks", "frozen_networks", "updates", "loss"):
            assert hasattr(cls, member), (cls.__name__, member)


def test_custom_method_trains_on_its_own_schedule(tmp_path):
    steps = 6
    method = TwoRoleToy()
    trainer = Trainer(method, _recipe(tmp_path, steps=steps), _data(), log_fn=lambda _l: None)
    assert list(trainer.networks) == ["critic", "generator"]  # the method's role order
    for i in range(steps):
        gen0, crit0 = _snapshot(method.gen), _snapshot(method.crit)
        record = trainer.train_step()
        generator_step = i % 3 == 1
        assert not _same(_snapshot(method.crit), crit0)
        assert _same(_snapshot(method.gen), gen0) == (not generator_step), i
        assert record["critic_updated"] and record["generator_updated"] == generator_step
        assert ("generator_loss" in record) == generator_step
        assert ("generator_fit" in record) == generator_step  # the loss's info, per role
        assert record["sparsity"] == 0.25
    # the schedule's order, each role over both micro-batches of the step
    want = []
    for i in range(steps):
        for role in method.updates(i):
            want += [(i, role)] * 2
    assert method.calls == want
    assert all(r is trainer.rng for r in method.rngs)  # the one training rng
    # each role's LR schedule steps with (and spans) its own updates: 6 critic, 2 generator
    assert update_counts(method, steps) == {"critic": 6, "generator": 2}
    assert trainer.schedulers["critic"].last_epoch == 6
    assert trainer.schedulers["generator"].last_epoch == 2
    gen_lrs = [r["generator_lr"] for r in trainer.history if r["generator_updated"]]
    assert gen_lrs == [pytest.approx(1e-2), pytest.approx(5e-3)]  # cosine over 2 updates


def test_custom_method_resume_equals_uninterrupted(tmp_path):
    k = 3
    full = Trainer(TwoRoleToy(), _recipe(tmp_path / "full", steps=2 * k), _data())
    full.train()
    recipe = _recipe(tmp_path / "half", steps=2 * k)
    first = Trainer(TwoRoleToy(), recipe, _data(), log_fn=lambda _l: None)
    first.train(k)
    first.save_checkpoint()
    second = Trainer(TwoRoleToy(), recipe, _data(), log_fn=lambda _l: None)
    assert second.resume() is not None
    second.train(k)

    def losses(history):
        return [{key: v for key, v in r.items() if key != "step_time"} for r in history]

    assert losses(second.history) == losses(full.history)
    for role, net in full.networks.items():
        assert _same(_snapshot(net), _snapshot(second.networks[role])), role


def test_trainer_names_what_a_method_gets_wrong(tmp_path):
    recipe = _recipe(tmp_path, steps=2)

    incomplete = type("Incomplete", (), {"name": "dmd", "roles": ("generator",)})()
    with pytest.raises(ValueError, match="lacks compute_device, device, sparsity, networks"):
        Trainer(incomplete, recipe, _data())

    class WrongRole(TwoRoleToy):
        def updates(self, step):
            return ("teacher",)

    with pytest.raises(ValueError, match="names role 'teacher'"):
        Trainer(WrongRole(), recipe, _data())

    class Mismatch(TwoRoleToy):
        roles = ("generator",)

    with pytest.raises(ValueError, match="must be the same"):
        Trainer(Mismatch(), recipe, _data())

    class Renamed(TwoRoleToy):
        roles = ("student", "critic")

        def networks(self):
            return {"student": self.gen, "critic": self.crit}

        def updates(self, step):
            return ("critic",)

    with pytest.raises(ValueError, match="role 'student' has no optimizer settings"):
        Trainer(Renamed(), recipe, _data())
