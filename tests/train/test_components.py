"""The trainer's components on their own, each given only what it needs (no Trainer): the schedule, the
checkpointer's interval and best head, the stop rules, and loading a checkpoint into named parts."""

from __future__ import annotations

import math

import pytest
import torch

from selmix_dist.config import Config, OptimConfig, RunConfig
from selmix_dist.train.build import RunSchedule
from selmix_dist.train.checkpointer import Checkpointer, NonFiniteStateError, list_step_checkpoints
from selmix_dist.train.resume import HeadState, OptimizerState, ResumePlan, checkpoint_body
from selmix_dist.train.stopping import COMPLETED, EARLY_STOP, SIGNAL, Stopping


def _cosine(step: int, total: int, base: float = 1.0) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def _schedule(total: int) -> tuple[torch.optim.SGD, RunSchedule]:
    head = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    return optimizer, RunSchedule(optimizer, OptimConfig(lr=1.0), total_steps=total)


def test_a_loaded_schedule_keeps_the_total_it_was_built_with():
    optimizer, schedule = _schedule(10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(_cosine(4, 10))
    state = schedule.state_dict()
    assert state["lr_lambdas"] == [None] and state["last_epoch"] == 4
    # resumed in a run extended to 20 steps: the counters come back, the schedule stays the new one
    optimizer2, longer = _schedule(20)
    longer.load_state_dict(state)
    optimizer2.step()
    longer.step()
    assert longer.get_last_lr()[0] == pytest.approx(_cosine(5, 20))
    # a checkpoint written before RunSchedule held the old LrSchedule's fields: they are not restored
    _, again = _schedule(20)
    again.load_state_dict({**state, "lr_lambdas": [{"total": 10, "warmup": 0, "constant": False}]})
    assert again.lr_lambdas[0].total == 20


def _body(step: int) -> dict:
    return {"format_version": 2, "step": step, "identity": {}, "config": {}, "head": {"weight": torch.zeros(2, 3)},
            "optimizer": {}, "scheduler": {}, "objective": {}, "refresh": None, "progress": {}}


def test_checkpointer_decides_the_interval_and_captures_only_when_it_writes(run_dir):
    c = Checkpointer(run_dir, keep=10, every=3)
    captured = []

    def capture(step):
        captured.append(step)
        return _body(step)

    for step in range(1, 8):
        c.save(step, lambda s=step: capture(s))
    c.save(7, lambda: capture(7), force=True)
    assert captured == [3, 6, 7]
    assert [s for s, _ in list_step_checkpoints(c.dir)] == [7, 6, 3]
    never = Checkpointer(run_dir, keep=10, every=0)  # 0: only forced checkpoints
    assert never.save(9, lambda: capture(9)) is None and captured == [3, 6, 7]


def test_best_head_is_kept_by_the_checkpointer_and_ties_keep_the_earlier_step(run_dir):
    c = Checkpointer(run_dir, keep=2)
    heads = {step: torch.nn.Linear(3, 2) for step in (0, 10, 20, 30)}
    calls = []

    def payload(step):
        calls.append(step)
        return {"head": HeadState(heads[step]).state_dict()}

    for step, metric in ((0, 0.2), (10, 0.5), (20, 0.5), (30, 0.3)):
        best = c.save_if_best(step, metric, lambda s=step: payload(s))
    assert best == {"metric": 0.5, "step": 10, "violation": 0.0} and calls == [0, 10]
    saved = torch.load(c.best_path, weights_only=True)
    assert (saved["step"], saved["metric"], saved["violation"]) == (10, 0.5, 0.0)
    assert torch.equal(c.best_head(3, 2).weight, heads[10].weight.detach())
    resumed = Checkpointer(run_dir, keep=2)
    resumed.load_state_dict(c.state_dict())
    assert resumed.save_if_best(40, 0.4, lambda: payload(40))["step"] == 10 and calls == [0, 10]


def test_best_head_of_a_constrained_objective_is_the_least_violating_then_the_highest_metric(run_dir):
    c = Checkpointer(run_dir, keep=2)
    head = {"head": HeadState(torch.nn.Linear(3, 2)).state_dict()}
    # (step, metric, violation) → the step that must be best after it, by hand: violation first, then metric.
    for step, metric, violation, expected in ((0, 0.9, 0.3, 0), (10, 0.5, 0.1, 10), (20, 0.8, 0.2, 10),
                                              (30, 0.4, 0.1, 10), (40, 0.2, 0.0, 40), (50, 0.3, 0.0, 50),
                                              (60, 0.9, 0.05, 50)):
        assert c.save_if_best(step, metric, lambda: head, violation=violation)["step"] == expected
    assert torch.load(c.best_path, weights_only=True)["step"] == 50
    old = Checkpointer(run_dir, keep=2)  # a checkpoint written before violations ranked best.pt
    old.load_state_dict({"best": {"metric": 0.5, "step": 10}})
    assert old.save_if_best(20, 0.6, lambda: head, violation=0.01)["step"] == 10


class _Signals:
    def __init__(self):
        self.received = False

    def requested(self) -> bool:
        return self.received


def _stopping(**run) -> tuple[Stopping, _Signals]:
    signals = _Signals()
    stopping = Stopping(RunConfig(**run), gain_guided=True, preemption=signals, lr=0.05, device=torch.device("cpu"))
    return stopping, signals


def test_stop_reasons():
    stopping, signals = _stopping(steps=20, signal_poll_every=5)
    assert stopping.before_step(19) is None and stopping.before_step(20) == COMPLETED
    signals.received = True
    assert [stopping.after_step(s) for s in (3, 4, 5, 6)] == [None, None, SIGNAL, None]  # polled at multiples only
    # early stopping: window 2 with a huge tolerance converges at the second refresh; off by default
    on, _ = _stopping(early_stop=True, early_stop_window=2, early_stop_tol=100)
    off, _ = _stopping(early_stop_window=2, early_stop_tol=100)
    assert [on.after_refresh(g) for g in (1.0, 1.0)] == [None, EARLY_STOP]
    assert [off.after_refresh(g) for g in (1.0, 1.0)] == [None, None] and off.convergence.history == [1.0, 1.0]
    uniform = Stopping(RunConfig(early_stop=True, early_stop_window=1), gain_guided=False, preemption=signals,
                       lr=0.05, device=torch.device("cpu"))
    assert uniform.after_refresh(1.0) is None


def test_a_non_finite_loss_is_raised_at_the_next_poll_naming_its_step():
    stopping, _ = _stopping(signal_poll_every=5)
    for step, loss in ((0, 1.0), (1, float("nan")), (2, float("inf")), (3, 1.0)):
        stopping.note_loss(step, torch.tensor(loss))
    assert stopping.after_step(4) is None  # not a poll: no host synchronisation
    with pytest.raises(NonFiniteStateError, match=r"non-finite at step 1 \(lr 0.05\)"):
        stopping.after_step(5)


def test_checkpoint_parts_round_trip_and_a_misfit_names_its_entry(tmp_path):
    head = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    parts = {"head": HeadState(head), "optimizer": OptimizerState(optimizer, sharded=False)}
    body = checkpoint_body(parts, step=7, complete=False, identity={"num_classes": 2}, config=Config(), world_size=1)
    assert body["step"] == 7 and body["seed"] == 0 and set(body["head"]) == {"weight", "bias"}
    assert OptimizerState(optimizer, sharded=True).state_dict() == {}
    fresh_head = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh_head.parameters(), lr=0.1, momentum=0.9)
    plan = ResumePlan(tmp_path / "step_00000007.pt", body)
    plan.load({"head": HeadState(fresh_head), "optimizer": OptimizerState(fresh_opt, sharded=False)})
    assert plan.step == 7 and torch.equal(fresh_head.weight, head.weight)
    momentum = optimizer.state[head.weight]["momentum_buffer"]
    assert torch.equal(fresh_opt.state[fresh_head.weight]["momentum_buffer"], momentum)
    with pytest.raises(ValueError, match=r"step_00000007.pt does not fit this run: its 'head' entry"):
        plan.load({"head": HeadState(torch.nn.Linear(4, 2))})


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_soft_counts_are_the_softmax_rows_summed_per_true_class_in_fixed_point(temperature):
    """Evaluator.statistics(soft_temperature=T): Σ softmax(logits / T) per true class, by a loop over the samples,
    in units of 2⁻³² (one rounding per sample and entry); as T → 0 it becomes 2³² × the argmax counts exactly."""
    from selmix_dist.features.sets import FeatureSet
    from selmix_dist.train.evaluator import SOFT_UNIT, Evaluator

    g = torch.Generator().manual_seed(3)
    k, n = 5, 37
    fs = FeatureSet(torch.randn(n, 4, generator=g), torch.randint(0, k, (n,), generator=g), "val")
    head = torch.nn.Linear(4, k)
    evaluator = Evaluator(k, batch_size=8, device=torch.device("cpu"), head_mask=torch.ones(k, dtype=torch.bool))
    stats = evaluator.statistics(head, fs, with_features=False, soft_temperature=temperature)
    expected = torch.zeros(k, k, dtype=torch.float64)
    with torch.no_grad():
        for x, y in zip(fs.features, fs.labels, strict=True):
            logits = head(x).double() / temperature
            expected[y] += torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
    assert stats.soft_counts.dtype == torch.int64
    # float32 logits of one row alone and of a batch differ by ~1e-7 (the kernels): that, not the 2⁻³³ rounding
    torch.testing.assert_close(stats.soft_counts.double() / SOFT_UNIT, expected, rtol=0, atol=2e-6)
    assert float(stats.soft_counts.sum()) / SOFT_UNIT == pytest.approx(n, abs=k * n / SOFT_UNIT)
    assert evaluator.statistics(head, fs, with_features=False).soft_counts is None
    cold = evaluator.statistics(head, fs, with_features=False, soft_temperature=1e-6)
    assert torch.equal(cold.soft_counts, cold.counts * int(SOFT_UNIT))
