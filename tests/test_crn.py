"""Common random numbers: two optimizers' evaluations consume identical instances.

Paired comparisons (DoPr-X vs X on one seed) are only paired if both evaluations score the same instances. The
task is built from (task config, seed, device) alone: the optimizer never reaches it. So here, per task at
scale=smoke, one task object evaluates two different models (the task's own and a perturbed copy, standing for
the weights two optimizers would reach) and the instances each evaluation consumed are captured and compared:
lm: the problems scored (through ``_score``); control: the episodes' environment seeds, the noise seed and every
action-noise draw; robot: the environment reset seeds, the policy-noise generator's seed and its state before every
draw; flow: the initial noise and labels given to generation. For lm, control and flow a task built with another
training seed (another run) is checked to give the same instances too. Noise is drawn for every episode at every
step, finished ones too, so a model whose episodes end sooner consumes a prefix of the same draws (checked so).
Every task is cheap enough for the fast suite (2-7 s each on 2 cores)."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (after conftest's two): small models generate ~100x slower on two threads of a busy
    two-core machine, and the instances do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose_task(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["scale=smoke", *overrides]).task


def perturbed(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """A copy with every weight moved by noise: another model, as another optimizer would leave."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean().clamp(min=1e-3) * torch.randn(p.shape, generator=g).to(p.dtype))
    return other


def assert_prefix_equal(a: list, b: list):
    """Two draw sequences: the shorter is the longer's beginning, bitwise, and neither is empty."""
    assert a and b
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_lm_scores_the_same_problems_for_two_models(tmp_path, monkeypatch):
    from experiments.tasks import lm

    seen = []
    original = lm.ArithmeticLM._score

    def recording(self, model, problems):
        seen[-1].append([(p["question"], p["answer"]) for p in problems])
        return original(self, model, problems)

    monkeypatch.setattr(lm.ArithmeticLM, "_score", recording)
    task = build_task(compose_task("task=lm", f"task.data_dir={tmp_path}"), 0, torch.device("cpu"))
    other_run = build_task(compose_task("task=lm", f"task.data_dir={tmp_path}"), 1, torch.device("cpu"))
    results = []
    for t, model in ((task, task.model), (task, perturbed(task.model)), (other_run, other_run.model)):
        seen.append([])
        results.append(t.evaluate(model))
    assert seen[0] == seen[1] == seen[2]
    assert len(seen[0]) == 2 + 1 + 2 and sum(map(len, seen[0])) > 0  # 2 lengths + 1 extrapolation + the selection sets
    # the models differ (the check is not of two copies of one model): their generations differ somewhere
    assert any(not torch.equal(a, b) for a, b in zip(task.model.parameters(), perturbed(task.model).parameters()))


class _RecordingRandom:
    """numpy.random for one module, whose default_rng records every standard_normal draw (per generator made)."""

    def __init__(self, log: list):
        self._log = log

    def default_rng(self, seed=None):
        rng, draws = np.random.default_rng(seed), []
        self._log.append({"seed": seed, "draws": draws})

        class Recording:
            def standard_normal(self, *args, **kwargs):
                x = rng.standard_normal(*args, **kwargs)
                draws.append(x.copy())
                return x

            def __getattr__(self, name):
                return getattr(rng, name)

        return Recording()

    def __getattr__(self, name):
        return getattr(np.random, name)


class _NumpyWithRecordingRandom:
    def __init__(self, log: list):
        self.random = _RecordingRandom(log)

    def __getattr__(self, name):
        return getattr(np, name)


def test_control_rolls_out_the_same_episodes_and_noise_for_two_models(tmp_path, monkeypatch):
    from experiments.tasks import control

    overrides = ("task=control", f"task.data_dir={tmp_path}", "task.eval_action_noise=0.1", "task.eval_episodes=3")
    task = build_task(compose_task(*overrides), 0, torch.device("cpu"))
    other_run = build_task(compose_task(*overrides), 1, torch.device("cpu"))
    calls, rngs = [], []
    original = control.rollout_returns

    def recording(env_id, policy, seeds, record=False, action_noise=0.0, noise_seed=0, max_steps=None):
        calls[-1].append({"env": env_id, "seeds": list(seeds), "action_noise": action_noise, "noise_seed": noise_seed})
        rngs[-1].append(len(log))  # where this rollout's generator will be in the log
        return original(env_id, policy, seeds, record, action_noise, noise_seed, max_steps)

    log = []
    monkeypatch.setattr(control, "rollout_returns", recording)
    monkeypatch.setattr(control, "np", _NumpyWithRecordingRandom(log))
    returns = []
    for t, model in ((task, task.model), (task, perturbed(task.model)), (other_run, other_run.model)):
        calls.append([])
        rngs.append([])
        returns.append(t.evaluate(model).outcomes["return"])
    assert calls[0] == calls[1] == calls[2]
    assert calls[0][0]["seeds"] == [20_000, 20_001, 20_002] and calls[0][0]["action_noise"] == 0.1  # reported episodes
    assert calls[0][1]["seeds"] == [30_000]  # the selection episode
    assert returns[0] != returns[1]  # two different policies: other returns, the same episodes and noise
    for i in range(len(calls[0])):  # every rollout: a generator from the same seed, and the same draws (a prefix where one ran shorter)
        runs = [log[r[i]] for r in rngs]
        assert runs[0]["seed"] == runs[1]["seed"] == runs[2]["seed"] == calls[0][i]["noise_seed"]
        assert_prefix_equal(runs[0]["draws"], runs[1]["draws"])
        assert_prefix_equal(runs[0]["draws"], runs[2]["draws"])
        assert all(d.shape == (len(calls[0][i]["seeds"]), 3) for d in runs[0]["draws"])  # drawn for every episode, every step


def test_robot_resets_the_same_seeds_and_draws_the_same_policy_noise_for_two_models(tmp_path, monkeypatch):
    from experiments import robot_sim
    from experiments.tasks import robot
    from test_robot import fixture_task

    settings = ("task.obs_keys=[robot0_eef_pos,robot0_gripper_qpos]", "task.horizon=24", "task.horizons=[8,24]",
                "task.eval_episodes=2", "task.select_episodes=1")
    monkeypatch.setattr(robot, "_ROLLOUT_ENVS", {})
    task = fixture_task(tmp_path, *settings)
    resets, generators, states = [], [], []
    gym_class = robot_sim._gym_wrapper()
    reset, policy = gym_class.reset, robot.RobotPolicy.policy

    def recording_reset(self, seed=None, options=None):
        resets[-1].append(seed)
        return reset(self, seed=seed, options=options)

    def recording_policy(self, model, g):
        generators[-1].append(g.initial_seed())
        act = policy(self, model, g)

        def recorded(history):
            states[-1].append((len(next(iter(history.values()))), g.get_state().clone()))  # the noise drawn next follows
            return act(history)
        return recorded

    monkeypatch.setattr(gym_class, "reset", recording_reset)
    monkeypatch.setattr(robot.RobotPolicy, "policy", recording_policy)
    try:
        for model in (task.model, perturbed(task.model)):
            resets.append([])
            generators.append([])
            states.append([])
            task.evaluate(model)
    finally:
        for envs in robot._ROLLOUT_ENVS.values():
            envs.close()
    assert resets[0] == resets[1] and sorted(set(resets[0])) == [50_000, 50_001, 70_000]  # 2 reported + 1 selection episode
    assert generators[0] == generators[1] == [50_000]
    # the policy-noise generator is in the same state before every replanning call both made, for as many rows
    for (n_a, s_a), (n_b, s_b) in zip(states[0], states[1]):
        assert n_a == n_b == 3 and torch.equal(s_a, s_b)
    assert states[0] and states[1]


def test_flow_generates_from_the_same_noise_and_labels_for_two_models(tmp_path, monkeypatch):
    from experiments.tasks import flow

    seen = []
    original = flow.FlowMatching.sample

    def recording(self, model, noise, labels, solver, steps):
        seen[-1].append((solver, steps, noise.clone(), labels.clone()))
        return original(self, model, noise, labels, solver, steps)

    task = build_task(compose_task("task=flow", f"task.data_dir={tmp_path}"), 0, torch.device("cpu"))
    other_run = build_task(compose_task("task=flow", f"task.data_dir={tmp_path}"), 1, torch.device("cpu"))
    monkeypatch.setattr(flow.FlowMatching, "sample", recording)
    for t, model in ((task, task.model), (task, perturbed(task.model)), (other_run, other_run.model)):
        seen.append([])
        t.evaluate(model)
    assert len(seen[0]) == len(seen[1]) == len(seen[2]) > 1
    for a, b, c in zip(*seen):
        assert a[:2] == b[:2] == c[:2]
        assert torch.equal(a[2], b[2]) and torch.equal(a[2], c[2]) and torch.equal(a[3], b[3]) and torch.equal(a[3], c[3])
