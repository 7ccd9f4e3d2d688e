"""The robot task: the scripted expert stacks and lifts, a robomimic-layout file written here with
plain h5py loads through the task's reader, the sequence windows pad as Diffusion Policy's sampler
does, AP covers the U-Net's Conv1d layers and both encoders, rollouts follow the seeds and the
env's own success check, and the real entry point runs with a one-episode rollout."""

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import dopr
from experiments import robot_sim
from experiments.robomimic_data import env_meta, read_demos
from experiments.tasks import robot, robot_vision
from test_experiments import ENV, rows, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env", ["Lift", "Stack"])
def test_scripted_expert_succeeds_at_least_90_percent(env):
    demos, meta, rate = robot_sim.generate_demos(env, 10, seed=7, noise=0.1, horizon=400, log=None)
    print(f"scripted expert success rate on {env}: {rate:.2f}")
    assert rate >= 0.9
    assert len(demos) == 10 and meta["env_name"] == env
    for d in demos:  # each demo ends at the first success: dones is 0 ... 0 1
        assert d["dones"][-1] == 1 and d["dones"][:-1].sum() == 0
        assert len(d["actions"]) == len(d["states"]) == len(d["obs"]["object"]) and np.abs(d["actions"]).max() <= 1


def test_demo_script_prints_the_success_rate_and_writes_robomimic_layout(tmp_path):
    out = tmp_path / "lift.hdf5"
    res = subprocess.run([sys.executable, "scripts/robot_demos.py", "--env", "Lift", "--demos", "3", "--val-demos", "1", "--out", str(out)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert float(re.search(r"success rate on Lift: ([\d.]+)", res.stdout)[1]) >= 0.9
    with h5py.File(out) as f:
        assert sorted(f["data"].keys()) == ["demo_0", "demo_1", "demo_2"]
        assert [n.decode() for n in f["mask/valid"][()]] == ["demo_0"]
        assert json.loads(f["data"].attrs["env_args"])["env_name"] == "Lift"
        assert f["data"].attrs["total"] == sum(f[f"data/{k}/actions"].shape[0] for k in f["data"])


def write_fixture(path: Path, lengths=(5, 7, 4), image: bool = True):
    """A robomimic-layout file written independently of the suite's writer: what robomimic's own
    datasets look like (low-dim keys, an 84x84 agentview image, actions, filter masks)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"], "control_freq": 20}})
        data.attrs["total"] = sum(lengths)
        for i, n in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = n
            g["obs/robot0_eef_pos"] = rng.standard_normal((n, 3))
            g["obs/robot0_gripper_qpos"] = rng.standard_normal((n, 2))
            g["obs/object"] = rng.standard_normal((n, 10))
            if image:
                g["obs/agentview_image"] = rng.integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)
            g["actions"] = np.clip(rng.standard_normal((n, 7)), -1, 1)
            g["rewards"], g["dones"], g["states"] = np.zeros(n), np.eye(n)[-1], rng.standard_normal((n, 32))
        f["mask/train"] = np.array([b"demo_1", b"demo_2"])
        f["mask/valid"] = np.array([b"demo_0"])
    return lengths


def test_independently_written_robomimic_file_loads_with_documented_shapes(tmp_path):
    path = tmp_path / "fixture.hdf5"
    lengths = write_fixture(path)
    keys = ["robot0_eef_pos", "robot0_gripper_qpos", "object", "agentview_image"]
    train_demos = read_demos(path, keys, "train")
    assert [d["name"] for d in train_demos] == ["demo_1", "demo_2"]
    d = train_demos[0]
    assert d["obs"]["robot0_eef_pos"].shape == (7, 3) and d["obs"]["robot0_eef_pos"].dtype == np.float32
    assert d["obs"]["object"].shape == (7, 10)
    assert d["obs"]["agentview_image"].shape == (7, 84, 84, 3) and d["obs"]["agentview_image"].dtype == np.uint8
    assert d["actions"].shape == (7, 7)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(d["obs"]["agentview_image"], f["data/demo_1/obs/agentview_image"][()])
    assert len(read_demos(path, keys)) == len(lengths)
    with pytest.raises(ValueError, match="has no observation .*robot0_eef_quat"):
        read_demos(path, ["robot0_eef_quat"])
    with pytest.raises(ValueError, match="no filter mask/test"):
        read_demos(path, keys, "test")
    with pytest.raises(FileNotFoundError, match="robot_demos.py"):
        read_demos(tmp_path / "missing.hdf5", keys)


def test_image_cache_gives_the_same_frames_and_batches_through_a_memory_map(tmp_path):
    path = tmp_path / "fixture.hdf5"
    write_fixture(path, lengths=(5, 7, 4, 6))
    keys = ["robot0_eef_pos", "agentview_image"]
    eager = read_demos(path, keys, "train")
    lazy = read_demos(path, keys, "train", image_cache=tmp_path / "cache")
    assert isinstance(lazy[0]["obs"]["agentview_image"], np.memmap)
    for e, z in zip(eager, lazy):
        np.testing.assert_array_equal(e["obs"]["agentview_image"], z["obs"]["agentview_image"])
    files = list((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 1
    read_demos(path, keys, "train", image_cache=tmp_path / "cache")  # written once, then reused
    assert list((tmp_path / "cache").glob("*.npy")) == files and files[0].stat().st_mtime_ns == files[0].stat().st_mtime_ns
    assert len(read_demos(path, keys, image_cache=tmp_path / "cache", limit=2)) == 2  # other demos: another file
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    a = robot.DemoWindows(eager, ["robot0_eef_pos"], ["agentview_image"], obs_horizon=2, action_horizon=4)
    b = robot.DemoWindows(lazy, ["robot0_eef_pos"], ["agentview_image"], obs_horizon=2, action_horizon=4)
    idx = torch.tensor([0, 3, 6, len(a) - 1])
    (oa, aa), (ob, ab) = a.batch(idx), b.batch(idx)
    assert torch.equal(oa["agentview_image"], ob["agentview_image"]) and torch.equal(aa, ab) and ob["agentview_image"].dtype == torch.uint8


LAZY_READ = """
import os, sys, numpy as np, torch
from experiments.robomimic_data import env_meta, read_demos
from experiments.tasks.robot import DemoWindows
def rss():  # the process's own (anonymous) resident memory now; pages of a mapped file are the kernel's page cache
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024
warm = torch.from_numpy(np.zeros((32, 2, 128, 128, 3), np.uint8))[torch.randint(0, 32, (32,))]  # torch's first allocations
del warm
before, peak = rss(), 0
demos = read_demos(sys.argv[1], ["robot0_eef_pos", "agentview_image"], image_cache=None if sys.argv[2] == "none" else sys.argv[2])
peak = max(peak, rss())
windows = DemoWindows(demos, ["robot0_eef_pos"], ["agentview_image"], obs_horizon=2, action_horizon=4)
peak = max(peak, rss())
g = torch.Generator().manual_seed(0)
for _ in range(3):
    obs, _ = windows.batch(torch.randint(0, len(windows), (32,), generator=g))
    assert obs["agentview_image"].shape[1:] == (2, 128, 128, 3)
    peak = max(peak, rss())
print(peak - before)
"""


def test_image_demos_are_read_lazily_under_a_memory_cap_smaller_than_the_file(tmp_path):
    # 40 demos x 60 frames of 128x128x3 (118 MB of images): with the image cache, reading them and
    # drawing batches raises the process's own resident memory (RssAnon: mapped file pages are page cache)
    # by less than a quarter of that; reading them
    # into memory (the cache off) raises it by more than the whole file.
    path = tmp_path / "images.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        for i in range(40):
            g = data.create_group(f"demo_{i}")
            g["obs/robot0_eef_pos"] = rng.standard_normal((60, 3))
            g["obs/agentview_image"] = rng.integers(0, 256, (60, 128, 128, 3), dtype=np.uint8)
            g["actions"] = rng.standard_normal((60, 7))
    size = path.stat().st_size
    assert size > 100 * 2**20
    grown = {}
    for mode in ("cache", "none"):
        out = subprocess.run([sys.executable, "-c", LAZY_READ, str(path), str(tmp_path / "cache") if mode == "cache" else "none"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        grown[mode] = int(out.stdout.strip().splitlines()[-1])
    assert grown["cache"] < 0.25 * size, (grown, size)
    assert grown["none"] > size, (grown, size)


def test_windows_pad_history_with_the_first_observation_and_chunks_with_the_last_action():
    n = 5
    demo = {"obs": {"x": np.arange(n, dtype=np.float32)[:, None]}, "actions": np.arange(n, dtype=np.float32)[:, None] * 10}
    w = robot.DemoWindows([demo, demo], ["x"], [], obs_horizon=2, action_horizon=4)
    assert len(w) == 2 * n
    obs, act = w.batch(torch.tensor([0, 3, 9]))
    assert obs["low_dim"][:, :, 0].tolist() == [[0, 0], [2, 3], [3, 4]]
    assert act[:, :, 0].tolist() == [[0, 10, 20, 30], [30, 40, 40, 40], [40, 40, 40, 40]]


def fixture_task(tmp_path, *overrides):
    path = tmp_path / "fixture.hdf5"
    write_fixture(path)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=robot", "scale=smoke", f"task.dataset={path}", f"task.image_cache={tmp_path / 'cache'}", *overrides])
    return robot.build(cfg.task, 0, torch.device("cpu"))


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_ap_covers_the_unet_conv1d_layers_and_both_encoders(tmp_path, objective):
    task = fixture_task(tmp_path, f"task.objective={objective}",
                        "task.obs_keys=[robot0_eef_pos,robot0_gripper_qpos,object,agentview_image]")
    model = task.model
    opt = dopr.build_optimizer(model, "dopr_adamw", lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = task.loss(model, task.train_batch(0))
    loss.backward()
    opt.step()
    coverage = opt.preconditioner.coverage()
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) >= 10
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            assert coverage[name].startswith("covered:") and "no input seen" not in coverage[name], (name, coverage[name])
    assert any(n.startswith("image_encoders.agentview_image") for n in coverage)
    assert any(n.startswith("low_dim_encoder") for n in coverage)
    assert not [n for n, v in coverage.items() if v.startswith("not covered")]
    assert torch.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the validation batches are the same twice (fixed noise), so the validation loss is a function of the weights
    a, b = list(task.val_batches()), list(task.val_batches())
    assert all(torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(a, b))
    # a sampled action chunk lies in the data's action range and has the chunk's shape
    history = {"robot0_eef_pos": np.zeros((3, 2, 3)), "robot0_gripper_qpos": np.zeros((3, 2, 2)), "object": np.zeros((3, 2, 10)),
               "agentview_image": np.zeros((3, 2, 84, 84, 3), dtype=np.uint8)}
    chunk = task.policy(model, torch.Generator().manual_seed(0))(history)
    assert chunk.shape == (3, task.cfg.action_steps, 7)
    lo, hi = task.train.actions.min(0).values.numpy(), task.train.actions.max(0).values.numpy()
    assert (chunk >= lo - 1e-5).all() and (chunk <= hi + 1e-5).all()


def test_resnet18_encoder_crops_randomly_in_training_pools_to_keypoints_and_ap_covers_it(tmp_path):
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = robot_vision.to_unit(images)
    crops = [robot_vision.crop(x, 0.75, training=True) for _ in range(4)]
    assert all(c.shape == (2, 3, 24, 24) for c in crops) and any(not torch.equal(crops[0], c) for c in crops[1:])
    for c in crops:  # every random crop is a window of its own image
        found = any(torch.equal(c[0], x[0, :, t : t + 24, l : l + 24]) for t in range(9) for l in range(9))
        assert found
    assert torch.equal(robot_vision.crop(x, 0.75, training=False), x[..., 4:28, 4:28]) and robot_vision.crop(x, None, training=True) is x
    # both encoders crop: the small CNN (crop_ratio set) sees only the window, ResNet-18 too
    for enc in (robot_vision.ImageEncoder(16, width=8, crop_ratio=0.75), robot_vision.ResNet18Encoder(16, crop_ratio=0.75, keypoints=8)):
        enc.eval()
        outside = images.clone()
        outside[:, :4] = 255 - outside[:, :4]  # change only rows the centre crop leaves out
        with torch.no_grad():
            assert torch.equal(enc(images), enc(outside))
    # spatial softmax: a map peaked at one pixel gives that pixel's coordinates
    pool = robot_vision.SpatialSoftmax(4, keypoints=1)
    with torch.no_grad():
        pool.proj.weight.zero_(); pool.proj.bias.zero_(); pool.proj.weight[0, 0] = 1.0
    peaked = torch.zeros(1, 4, 5, 9)
    peaked[0, 0, 4, 0] = 100.0  # bottom-left
    torch.testing.assert_close(pool(peaked), torch.tensor([[-1.0, 1.0]]), atol=1e-4, rtol=0)
    task = fixture_task(tmp_path, "task.obs_keys=[robot0_eef_pos,agentview_image]", "task.model.encoder=resnet18", "task.model.crop_ratio=0.9")
    opt = dopr.build_optimizer(task.model, "dopr_adamw", lr=1e-3)
    task.loss(task.model, task.train_batch(0)).backward()
    opt.step()
    coverage = opt.preconditioner.coverage()
    convs = [n for n, m in task.model.image_encoders.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3 + 1  # stem, 8 blocks x 2, 3 downsampling skips, the keypoint projection
    assert all(coverage[f"image_encoders.{n}"].startswith("covered: conv") for n in convs)


def test_action_normalisation_round_trips_and_maps_the_data_to_the_unit_box(tmp_path):
    task = fixture_task(tmp_path, "task.obs_keys=[robot0_eef_pos,object]")
    a = task.train.actions
    z = task.model.normalize_actions(a)
    assert z.min() >= -1 - 1e-6 and z.max() <= 1 + 1e-6 and torch.allclose(z.min(0).values, -torch.ones(7))
    torch.testing.assert_close(task.model.unnormalize_actions(z), a, atol=1e-5, rtol=1e-5)


def test_wilson_interval_matches_published_values():
    # Wilson 95% intervals (z = 1.96): 0/20 -> [0, 0.1611], 10/20 -> [0.2993, 0.7007], 18/20 -> [0.6990, 0.9721]
    for (k, n), expected in {(0, 20): (0.0, 0.1611), (10, 20): (0.2993, 0.7007), (18, 20): (0.6990, 0.9721)}.items():
        np.testing.assert_allclose(robot.wilson_interval(k, n), expected, atol=1e-4)


def test_rollouts_follow_the_seeds_and_end_on_the_envs_success_check():
    """The scripted expert as a (per-env, stateful) policy through the batched rollout: it succeeds,
    and the same seeds give the same episodes, other seeds other ones."""
    meta = robot_sim.suite_meta("Lift", horizon=100)
    keys = ["robot0_eef_pos", "robot0_eef_quat", "cube_pos", "cube_quat"]

    def run(seeds, envs=None):
        experts = [robot_sim.ScriptedExpert("Lift") for _ in seeds]

        def policy(history):
            return np.stack([e.act({k: history[k][i, -1] for k in keys}) for i, e in enumerate(experts)])[:, None]
        return robot_sim.rollout(policy, meta, keys, seeds, horizon=100, obs_horizon=2, envs=envs)

    envs = robot_sim.vector_env(meta, keys, 100, 84, 3)
    first, again, other = run([1, 2, 3], envs), run([1, 2, 3]), run([4, 5, 6])
    assert first["success"].all() and (first["length"] < 100).all()
    np.testing.assert_array_equal(first["length"], again["length"])
    assert not np.array_equal(first["length"], other["length"])
    # a finished episode is not stepped again (each environment's step count is its episode's length,
    # where gymnasium's vector step would have auto-reset it and stepped on), and an episode is the same
    # alone as in a batch
    assert [e.t for e in envs.envs] == list(first["length"]) and len(set(first["length"])) > 1
    envs.close()
    np.testing.assert_array_equal(first["length"], [run([s])["length"][0] for s in (1, 2, 3)])
    # and a policy that does nothing never succeeds: the episode runs to the horizon
    idle = robot_sim.rollout(lambda h: np.zeros((len(h["cube_pos"]), 4, 7)), meta, keys, [1, 2], horizon=30, obs_horizon=2)
    assert not idle["success"].any() and (idle["length"] == 30).all()


def test_soft_resets_are_used_only_where_they_give_the_hard_reset_episodes():
    """Rollout environments without cameras reset softly (the model is reset, not rebuilt from XML) when
    that starts each seed where a hard reset does: on Stack the episodes are then the same, bitwise, as
    under robosuite's hard reset; Lift draws its cube's size when it builds the model, so it keeps hard resets."""
    assert not robot_sim.soft_reset_matches(robot_sim.suite_meta("Lift", horizon=50))
    meta = robot_sim.suite_meta("Stack", horizon=50)
    assert robot_sim.soft_reset_matches(meta)
    keys = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
    envs = robot_sim.vector_env(meta, keys, 50, 84, 1)
    soft, hard = envs.envs[0], robot_sim.RobomimicGym(meta, keys, 50)
    assert not soft.env.hard_reset and hard.env.hard_reset
    actions = np.random.default_rng(0).uniform(-1, 1, (20, 7))
    for seed in (50000, 70001, 50000):  # the same seed again after other episodes: the same episode
        a, _ = soft.reset(seed=seed)
        b, _ = hard.reset(seed=seed)
        for act in actions:
            for k in keys:
                np.testing.assert_array_equal(a[k], b[k])
            a, *_ = soft.step(act)
            b, *_ = hard.step(act)
    assert not np.array_equal(soft.reset(seed=1)[0]["object"], soft.reset(seed=2)[0]["object"])
    envs.close()


def test_evaluations_and_runs_reuse_one_set_of_rollout_environments(tmp_path, monkeypatch):
    """The rollout environments are built once per process and settings: the evaluations of a run and
    the runs after it (hydra's joblib workers run many) reuse them and see the same episodes, bitwise,
    as on fresh environments; other settings replace them."""
    built, seen = [], []
    original, act = robot_sim.RobomimicGym, robot.RobotPolicy.policy

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    def recording(self, model, g):  # every observation history the policy is given
        policy = act(self, model, g)
        return lambda history: (seen[-1].append({k: v.copy() for k, v in history.items()}), policy(history))[1]

    monkeypatch.setattr(robot_sim, "RobomimicGym", counting)
    monkeypatch.setattr(robot.RobotPolicy, "policy", recording)
    monkeypatch.setattr(robot, "_ROLLOUT_ENVS", {})
    settings = ("task.obs_keys=[robot0_eef_pos,robot0_gripper_qpos]", "task.horizon=24", "task.horizons=[8,24]", "task.select_episodes=1")
    task = fixture_task(tmp_path, *settings, "task.eval_episodes=2")

    def evaluate(task, model):
        seen.append([])
        return task.evaluate(model)

    (first, outcomes), second = (lambda r: (r.metrics, r.outcomes))(evaluate(task, task.model)), evaluate(task, task.model).metrics
    assert len(built) == 3  # 2 reported + 1 selection episode, built once for both evaluations
    assert first.keys() == second.keys() and "select_success" in first and len(outcomes["success"]) == 2
    # the next run in this process: no environment built, the same episodes as the first evaluation's
    next_run = fixture_task(tmp_path, *settings, "task.eval_episodes=2")
    evaluate(next_run, task.model)
    assert len(built) == 3 and len(seen[0]) > 1
    for episodes in seen[1:]:
        assert len(episodes) == len(seen[0])
        for a, b in zip(seen[0], episodes):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # a light rollout (trainer.light_rollout_every, the budget axis) steps the same environments, none built, and its
    # episodes are the full evaluation's first ones: the same observations at every policy call
    task.cfg.light_episodes = 1
    seen.append([])
    light = task.light_evaluate(task.model).metrics
    assert len(built) == 3 and set(light) == {"success", "episode_length"}
    assert light["episode_length"] == outcomes["episode_length"][0] and light["success"] == outcomes["success"][0]
    assert len(seen[-1]) == len(seen[0])
    for a, b in zip(seen[0], seen[-1]):
        for k in a:
            np.testing.assert_array_equal(a[k][0], b[k][0])
    # other settings: a new set, the old one closed
    old = next(iter(robot._ROLLOUT_ENVS.values()))
    evaluate(fixture_task(tmp_path, *settings, "task.eval_episodes=3"), task.model)
    assert len(built) == 3 + 4 and old.closed and len(robot._ROLLOUT_ENVS) == 1


def test_smoke_run_of_the_entry_point_with_a_one_episode_rollout(tmp_path):
    run = tmp_path / "run"
    train("task=robot", "optimizer=dopr_adamw", f"task.data_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", "task.select_episodes=1")
    summary = json.loads((run / "summary.json").read_text())
    final = summary["final"]
    assert summary["best"]["chosen_on"] == "selection set" and final["select_success"] in (0.0, 1.0)
    assert len(next(r for r in rows(run) if "outcomes" in r)["outcomes"]["success"]) == 1  # the selection episode is not reported
    assert summary["status"] == "done" and summary["metric_name"] == "success"
    assert {"success", "success_ci_low", "success_ci_high", "episode_length", "success_h20", "success_h40"} <= set(final)
    assert final["success"] in (0.0, 1.0) and 0 < final["episode_length"] <= 40  # one episode, horizon 40 at smoke scale
    coverage = next(r["ap_coverage"] for r in rows(run) if "ap_coverage" in r)
    assert any(n.startswith("unet.down.0.0.block1") and v.startswith("covered: conv") for n, v in coverage.items())
    assert not [n for n, v in coverage.items() if v.startswith("not covered")]
    assert list((tmp_path / "cache").glob("Lift_expert_*.hdf5"))


def test_image_observations_render_in_batched_rollouts():
    """The pixel path of a rollout (offscreen rendering, EGL here): agentview and wrist frames
    arrive as uint8 (n, obs_horizon, 84, 84, 3) histories, and they change as the arm moves."""
    meta = robot_sim.suite_meta("Lift", horizon=400)
    keys = ["robot0_eef_pos", "agentview_image", "robot0_eye_in_hand_image"]
    seen = []

    def policy(history):
        seen.append({k: v.copy() for k, v in history.items()})
        return np.tile([0.0, 0.0, -1.0, 0, 0, 0, -1], (len(history["robot0_eef_pos"]), 4, 1))  # move down

    out = robot_sim.rollout(policy, meta, keys, [1, 2], horizon=8, obs_horizon=2)
    assert (out["length"] == 8).all()
    first, second = seen
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        assert first[key].shape == (2, 2, 84, 84, 3) and first[key].dtype == np.uint8
        assert first[key].std() > 5  # a rendered scene, not a blank frame
        assert not np.array_equal(first[key][:, -1], second[key][:, -1])  # the wrist camera moved down


def test_resets_of_a_rendering_environment_leave_no_old_simulations_behind(tmp_path):
    """robosuite's hard reset replaces the MjSim and its offscreen render context (~0.3 GB each with two
    cameras) and leaves the old ones in reference cycles; the image variant's rollouts ran out of memory
    on them. After any number of resets, one simulation and one render context (the live ones) exist, and
    the frames still show the scene (freeing an old renderer in the wrong GL context blanks the live one)."""
    import gc

    from robosuite.utils.binding_utils import MjRenderContext, MjSim

    low = tmp_path / "lift.hdf5"
    robot_sim.write_expert_dataset(low, "Lift", 2, 1, seed=1, noise=0.1, horizon=200, log=None)
    env = robot_sim.RobomimicGym(env_meta(low), ["robot0_eef_pos", "agentview_image"], 200, ["agentview_image"], 32)
    gc.disable()  # the collector must not run by chance between resets: the reset itself must free the old sim
    try:
        for seed in range(3):
            env.reset(seed=seed)
        sims = [o for o in gc.get_objects() if isinstance(o, MjSim)]
        contexts = [o for o in gc.get_objects() if isinstance(o, MjRenderContext)]
    finally:
        gc.enable()
    assert len(sims) == 1 and sims[0] is env.env.sim
    assert len(contexts) == 1 and contexts[0] is env.env.sim._render_context_offscreen
    first = env.reset(seed=0)[0]["agentview_image"]
    assert first.std() > 5 and env.step(np.zeros(env.action_space.shape))[0]["agentview_image"].std() > 5
    env.close()


def test_rendered_demo_images_are_what_a_rollout_sees(tmp_path):
    """The image variant's demos (robot_sim.add_rendered_images): each demo re-run from its seed with its
    actions gives frames identical to those a rollout environment shows when it starts from that seed
    and executes those actions; the low-dim data, actions and masks are copied unchanged; a file whose
    demos carry no seed is refused with the fix."""
    low, images = tmp_path / "lift.hdf5", tmp_path / "lift_img.hdf5"
    robot_sim.write_expert_dataset(low, "Lift", 2, 1, seed=1, noise=0.1, horizon=200, log=None)
    robot_sim.add_rendered_images(low, images, ["agentview_image"], 84, log=None)
    keys = ["robot0_eef_pos", "agentview_image"]
    demo, plain = read_demos(images, keys)[0], read_demos(low, ["robot0_eef_pos"])[0]
    frames = demo["obs"]["agentview_image"]
    assert frames.dtype == np.uint8 and frames.shape == (len(demo["actions"]), 84, 84, 3) and frames.std() > 5
    np.testing.assert_array_equal(demo["actions"], plain["actions"])
    np.testing.assert_array_equal(demo["obs"]["robot0_eef_pos"], plain["obs"]["robot0_eef_pos"])
    with h5py.File(images) as f, h5py.File(low) as g:
        assert list(f["mask/train"][()]) == list(g["mask/train"][()])
        seed = int(g["data/demo_0"].attrs["seed"])
    env = robot_sim.RobomimicGym(env_meta(low), keys, 200, ["agentview_image"], 84)
    obs, _ = env.reset(seed=seed)
    for t in range(len(frames)):
        # the same up to a grey level on a few pixels (the simulations agree to ~1e-8); rendering after
        # setting each recorded state, robomimic's way, is off by up to ~100 levels on 5% of them
        diff = np.abs(obs["agentview_image"].astype(int) - frames[t])
        assert diff.max() <= 2 and (diff > 0).mean() < 1e-3, (t, diff.max(), (diff > 0).mean())
        np.testing.assert_allclose(obs["robot0_eef_pos"], demo["obs"]["robot0_eef_pos"][t], atol=1e-6)
        if t + 1 < len(frames):
            obs = env.step(demo["actions"][t].astype(np.float64))[0]
    env.close()
    with h5py.File(low, "a") as f:
        del f["data/demo_0"].attrs["seed"]
    with pytest.raises(ValueError, match="regenerate"):
        robot_sim.add_rendered_images(low, tmp_path / "again.hdf5", ["agentview_image"], 84, log=None)


@pytest.mark.slow  # about a minute (rendering): keeps `make test` under 10 minutes; .ci/run runs it
def test_image_variant_runs_from_pixels_through_the_entry_point(tmp_path):
    """task=robot_image: the embedded demos get camera frames rendered once (cached beside the low-dim
    file), the policy reads both cameras through cropping CNN encoders that AP covers, and the rollout
    renders with the same fast settings."""
    run = tmp_path / "run"
    train("task=robot_image", "optimizer=dopr_adamw", f"task.data_dir={tmp_path / 'cache'}", f"task.image_cache={tmp_path / 'frames'}",
          f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["final"]["success"] in (0.0, 1.0)
    [rendered] = list((tmp_path / "cache").glob("Lift_expert_*_img32fast_agentview-robot0_eye_in_hand.hdf5"))
    with h5py.File(rendered) as f:
        assert f["data/demo_0/obs/agentview_image"].shape[1:] == (32, 32, 3)
    coverage = next(r["ap_coverage"] for r in rows(run) if "ap_coverage" in r)
    for camera in ("agentview_image", "robot0_eye_in_hand_image"):
        assert coverage[f"image_encoders.{camera}.net.0"].startswith("covered: conv")
