"""robosuite for the robot task: environments built from a robomimic dataset's env metadata, the
scripted expert that makes the embedded demonstrations, and batched rollouts that follow
robomimic's protocol (fixed seeds, a horizon, an episode ends on the environment's own success check).

robosuite 1.5.2 is installed without its dependency ``mink`` (whole-body IK for humanoids, unused
here), which pins numpy < 2: see the Makefile's setup target.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import time
import warnings

import numpy as np

from .robomimic_data import IMAGE_SUFFIX, is_image_key

# robomimic renames robosuite's observation keys; the datasets use robomimic's names.
ROBOSUITE_TO_ROBOMIMIC = {"object-state": "object"}
LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]  # robomimic's low-dim set


def _quiet():
    """Import robosuite without its import-time notices (no private macro file, optional robot models
    and the mink IK it does not need here) and keep its per-env controller-config warnings quiet."""
    if "robosuite" not in sys.modules:
        logging.disable(logging.WARNING)
        try:
            import robosuite  # noqa: F401
        finally:
            logging.disable(logging.NOTSET)
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)


def suite_meta(env_name: str, horizon: int) -> dict:
    """robomimic-style env metadata for a robosuite task with a Panda arm and the OSC_POSE controller
    (delta end-effector pose; what robomimic's datasets use), 20 Hz control."""
    _quiet()
    from robosuite.controllers import load_composite_controller_config

    kwargs = {"robots": "Panda", "controller_configs": load_composite_controller_config(controller="BASIC", robot="Panda"),
              "control_freq": 20, "reward_shaping": False, "use_object_obs": True, "horizon": horizon}
    return {"env_name": env_name, "type": 1, "env_kwargs": kwargs}


def make_env(meta: dict, image_keys=(), image_size: int = 84, seed: int | None = None, hard_reset: bool = True):
    """A robosuite environment from env metadata (ours or a robomimic dataset's). Controller configs
    in robosuite <= 1.4's format (robomimic's datasets) are converted to 1.5's composite form.
    Image keys (``<camera>_image``) turn on the offscreen renderer for those cameras."""
    _quiet()
    import robosuite as suite
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    kwargs = copy.deepcopy(meta["env_kwargs"])
    robots = kwargs.get("robots", "Panda")
    robot = robots if isinstance(robots, str) else robots[0]
    if "controller_configs" in kwargs:
        kwargs["controller_configs"] = refactor_composite_controller_config(kwargs["controller_configs"], robot, ["right"])
    cameras = [k[: -len(IMAGE_SUFFIX)] for k in image_keys]
    kwargs.update(has_renderer=False, has_offscreen_renderer=bool(cameras), use_camera_obs=bool(cameras),
                  ignore_done=True, hard_reset=hard_reset)  # the rollout loop owns the horizon
    if cameras:
        kwargs.update(camera_names=cameras, camera_heights=image_size, camera_widths=image_size)
    return suite.make(meta["env_name"], seed=seed, **kwargs)


def soft_reset_matches(meta: dict, seed: int = 0) -> bool:
    """Whether a soft reset (robosuite's hard_reset=False: the loaded model is reset, not rebuilt from XML;
    1 ms instead of ~0.2 s) starts a seed's episode from the hard reset's state. True for Stack, where
    the episodes are then the same, bitwise (tests/test_robot.py); False for Lift, which draws its cube's
    size from the env's rng when it builds the model, so soft resets would keep one size and shift the draws."""
    env = make_env(meta)
    try:
        states = []
        for hard in (True, False):
            env.hard_reset = hard
            reseed(env, seed)
            env.reset()
            states.append(env.sim.get_state().flatten())
        return bool(np.array_equal(*states))
    finally:
        env.close()


def reseed(env, seed: int) -> None:
    """Make the next reset's initial state a function of ``seed`` alone (robosuite 1.5 draws it from
    the env's rng, shared with its placement sampler)."""
    rng = np.random.default_rng(seed)
    env.rng = rng
    sampler = getattr(env, "placement_initializer", None)
    if sampler is not None:
        for s in [sampler, *getattr(sampler, "samplers", {}).values()]:
            s.rng = rng


def robomimic_obs(obs: dict) -> dict:
    out = {ROBOSUITE_TO_ROBOMIMIC.get(k, k): v for k, v in obs.items()}
    for k in list(out):
        if is_image_key(k):  # robosuite renders upside down (OpenGL); robomimic's datasets store it flipped
            out[k] = out[k][::-1].copy()
    return out


# ----------------------------------------------------------------------------- scripted expert
def _yaw(quat) -> float:
    import robosuite.utils.transform_utils as T

    R = T.quat2mat(quat)  # robosuite quaternions are (x, y, z, w)
    return float(np.arctan2(R[1, 0], R[0, 0]))


def _wrap(angle: float, period: float) -> float:
    return (angle + period / 2) % period - period / 2


class ScriptedExpert:
    """Waypoints for Lift and Stack, tracked with proportional delta-pose commands to the OSC
    controller: above the cube with the gripper's yaw aligned to a cube face, down, close, up (Lift
    ends here), over the other cube, down onto it, open. Gaussian noise on the arm's six action
    dimensions (``noise``) makes the demonstrations less regular, as human ones are."""

    TASKS = ("Lift", "Stack")

    def __init__(self, env_name: str, noise: float = 0.0, rng: np.random.Generator | None = None):
        if env_name not in self.TASKS:
            raise ValueError(f"no scripted expert for {env_name!r}: choose one of {self.TASKS}")
        self.env_name, self.noise = env_name, noise
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.phase, self.timer = "above", 0

    def act(self, obs: dict) -> np.ndarray:
        eef = obs["robot0_eef_pos"]
        cube = "cube" if self.env_name == "Lift" else "cubeA"
        p = obs[f"{cube}_pos"]
        # a cube is symmetric under quarter turns: align the fingers with the nearest face
        yaw_err = _wrap(_yaw(obs[f"{cube}_quat"]) - _yaw(obs["robot0_eef_quat"]), np.pi / 2)
        grip, phase = -1.0, self.phase
        if phase == "above":
            target = p + [0, 0, 0.08]
            if np.linalg.norm(target - eef) < 0.01 and abs(yaw_err) < 0.05:
                self.phase = "down"
        elif phase == "down":
            target = p.copy()
            if np.linalg.norm(target - eef) < 0.008:
                self.phase, self.timer = "close", 0
        elif phase == "close":
            target, grip = p.copy(), 1.0
            self.timer += 1
            if self.timer > 10:
                self.phase = "up"
        elif phase == "up":
            grip = 1.0
            if self.env_name == "Lift":
                target = np.array([eef[0], eef[1], p[2] + 0.2])
            else:
                q = obs["cubeB_pos"]
                target = np.array([eef[0], eef[1], q[2] + 0.12])
                if eef[2] > q[2] + 0.09:
                    self.phase = "over"
        elif phase == "over":  # carry cube A over cube B (move the hand so that A's centre is above B's)
            grip, yaw_err = 1.0, 0.0
            q = obs["cubeB_pos"]
            target = q + [0, 0, 0.10] + (eef - p) * [1, 1, 0]
            if np.linalg.norm((p - q)[:2]) < 0.008:
                self.phase = "lower"
        elif phase == "lower":  # until A (half-size 0.02) rests on B (half-size 0.025)
            grip, yaw_err = 1.0, 0.0
            q = obs["cubeB_pos"]
            target = q + [0, 0, 0.051] + (eef - p)
            if p[2] - q[2] < 0.05:
                self.phase, self.timer = "release", 0
        elif phase == "release":
            grip, yaw_err, target = -1.0, 0.0, eef.copy()
            self.timer += 1
            if self.timer > 8:
                self.phase = "retreat"
        else:
            grip, yaw_err, target = -1.0, 0.0, eef + [0, 0, 0.05]
        # OSC_POSE input 1 = 5 cm / 0.5 rad per step; gains 2 (position) and 3 (yaw), clipped
        action = np.concatenate([np.clip((target - eef) / 0.05 * 2.0, -1, 1), [0.0, 0.0, np.clip(yaw_err / 0.5 * 3.0, -1, 1)], [grip]])
        if self.noise:
            action[:6] += self.noise * self.rng.standard_normal(6)
        return np.clip(action, -1, 1)


def generate_demos(env_name: str, episodes: int, seed: int, noise: float, horizon: int, log=print):
    """Run the scripted expert from seeds ``seed*100000 + i`` until ``episodes`` successful episodes
    (robomimic's PH datasets hold successes only). Returns (demos in robomimic's form, env meta,
    success rate over all attempts). Each demo ends at the first step the env reports success."""
    meta = suite_meta(env_name, horizon)
    env = make_env(meta, seed=seed)
    demos, attempts, t0 = [], 0, time.time()
    while len(demos) < episodes:
        if attempts >= 3 * episodes + 10:
            raise RuntimeError(f"the scripted expert succeeded in only {len(demos)} of {attempts} {env_name} episodes")
        episode_seed = seed * 100_000 + attempts
        attempts += 1
        reseed(env, episode_seed)
        obs = robomimic_obs(env.reset())
        expert = ScriptedExpert(env_name, noise, np.random.default_rng(episode_seed))
        record = {"obs": [], "actions": [], "rewards": [], "dones": [], "states": []}
        success = False
        for _ in range(horizon):
            record["states"].append(np.asarray(env.sim.get_state().flatten()))
            record["obs"].append(obs)
            action = expert.act(obs)
            raw, reward, _, _ = env.step(action)
            obs = robomimic_obs(raw)
            success = bool(env._check_success())
            record["actions"].append(action)
            record["rewards"].append(float(reward))
            record["dones"].append(int(success))
            if success:
                break
        if success:
            keys = record["obs"][0].keys()
            demos.append({"obs": {k: np.stack([o[k] for o in record["obs"]]) for k in keys}, "seed": episode_seed,
                          **{k: np.asarray(record[k]) for k in ("actions", "rewards", "dones", "states")}})
        if log and attempts % 10 == 0:
            log(f"  {env_name}: {len(demos)}/{episodes} demos from {attempts} attempts ({time.time() - t0:.0f} s)")
    env.close()
    return demos, meta, len(demos) / attempts


def add_rendered_images(src, dst, image_keys: list[str], image_size: int = 84, fast_render: bool = False, log=print) -> None:
    """Copy the robomimic file ``src`` to ``dst`` with camera frames (``<camera>_image``, uint8 H x W x 3)
    added to every demo, by re-running the demo: reset from its episode seed (the demo's ``seed``
    attribute, written by ``generate_demos``) and execute its recorded actions in a rollout
    environment (``RobomimicGym``), so each frame is exactly what a rollout sees in that state; the
    recorded states are checked on the way. robomimic's ``dataset_states_to_obs`` instead renders
    after setting each recorded state: in robosuite 1.5 that showed the moving arm up to ~100 grey
    levels off a rollout's frame on ~5% of the pixels (measured on Lift; a robosuite observation is
    not a function of the recorded state alone), and stepping from a set state drifted from the
    recorded next state by 0.1 (the controller keeps state of its own), so neither is used here."""
    import h5py

    from .robomimic_data import env_meta, write_demos

    meta = env_meta(src)
    demos, t0 = [], time.time()
    with h5py.File(src, "r") as f:
        names = sorted(f["data"], key=lambda n: int(n.rsplit("_", 1)[1]))
        if [f"demo_{k}" for k in range(len(names))] != names:
            raise ValueError(f"{src}: demos must be named demo_0 .. demo_{len(names) - 1} to be copied with their masks")
        masks = {k: [m.decode() for m in f["mask"][k][()]] for k in f["mask"]} if "mask" in f else None
        longest = max(len(f["data"][n]["actions"]) for n in names)
        env = RobomimicGym(meta, image_keys, longest + 1, image_keys, image_size, fast_render)
        for i, name in enumerate(names):
            g = f["data"][name]
            if "seed" not in g.attrs or "states" not in g:
                raise ValueError(f"{src}:{name} has no episode seed (attribute seed) or no states: only demos made by "
                                 f"generate_demos can be re-run; regenerate the file (scripts/robot_demos.py, or delete "
                                 f"it from task.data_dir and the task makes it again)")
            states, actions = g["states"][()], g["actions"][()]
            obs, _ = env.reset(seed=int(g.attrs["seed"]))
            frames = {k: [obs[k]] for k in image_keys}
            for t in range(1, len(states)):
                obs = env.step(actions[t - 1])[0]
                for k in image_keys:
                    frames[k].append(obs[k])
            drift = float(np.abs(env.env.sim.get_state().flatten() - states[-1]).max())
            if drift > 1e-4:
                raise ValueError(f"{src}:{name}: re-running its actions from its seed ends {drift:.2g} away from its recorded "
                                 f"last state: the file was made by another simulator version; regenerate it")
            demos.append({"obs": {**{k: g["obs"][k][()] for k in g["obs"]}, **{k: np.stack(v) for k, v in frames.items()}},
                          "seed": int(g.attrs["seed"]), **{k: g[k][()] for k in ("actions", "rewards", "dones", "states") if k in g}})
            if log and (i + 1) % 10 == 0:
                log(f"  rendered {i + 1}/{len(names)} demos ({time.time() - t0:.0f} s)")
        env.close()
    write_demos(dst, demos, meta, masks)
    if log:
        log(f"rendered {', '.join(image_keys)} at {image_size}x{image_size} for {len(demos)} demos in {time.time() - t0:.0f} s; wrote {dst}")


# ------------------------------------------------------------------------------------ rollouts
def vector_env(meta: dict, obs_keys: list[str], horizon: int, image_size: int, num_envs: int, vectorization: str = "sync",
               fast_render: bool = False):
    """``num_envs`` environments stepped together: gymnasium's sync vector env, or its async one (one
    process per environment) over robosuite's GymWrapper. Build once and pass to ``rollout(envs=...)``
    to reuse them across evaluations (robosuite environments take seconds to build)."""
    import gymnasium as gym

    if vectorization not in ("sync", "async"):
        raise ValueError(f"task.vectorization={vectorization!r}: choose sync or async")
    image_keys = [k for k in obs_keys if is_image_key(k)]
    # Environments without cameras reset softly where that gives the hard reset's episodes (checked once
    # here); camera environments keep robosuite's hard reset (their renderer handling expects it).
    soft = not image_keys and soft_reset_matches(meta)
    envs_fn = [lambda: RobomimicGym(meta, obs_keys, horizon, image_keys, image_size, fast_render, soft_reset=soft) for _ in range(num_envs)]
    return gym.vector.SyncVectorEnv(envs_fn) if vectorization == "sync" else gym.vector.AsyncVectorEnv(envs_fn, context="spawn")


def rollout(policy, meta: dict, obs_keys: list[str], seeds: list[int], horizon: int, obs_horizon: int,
            image_size: int = 84, num_envs: int | None = None, vectorization: str = "sync", envs=None) -> dict:
    """Receding-horizon rollouts, one episode per seed, ``num_envs`` environments at a time
    (gymnasium's sync or async vector env over robosuite's GymWrapper), one batched policy call per
    replanning step for all of them. ``policy(obs)`` takes {key: (n, obs_horizon, ...)
    array} and returns an (n, k, action_dim) array of k actions to execute. An episode ends on success
    or at ``horizon``, and from then on costs nothing: with the sync vector env only the running
    environments are stepped (gymnasium's vector step would step, and auto-reset, every one of them
    until the wave's longest episode ends); the async one steps all of them (it cannot step a subset).
    Returns per-episode arrays: success (bool), length (steps). ``envs`` (from ``vector_env``) are used
    and left open; without them, ``num_envs`` are built and closed."""
    import gymnasium as gym

    own = envs is None
    if own:
        num_envs = min(num_envs or len(seeds), len(seeds))
        envs = vector_env(meta, obs_keys, horizon, image_size, num_envs, vectorization)
    num_envs = envs.num_envs
    single = envs.envs if isinstance(envs, gym.vector.SyncVectorEnv) else None
    success = np.zeros(len(seeds), dtype=bool)
    length = np.zeros(len(seeds), dtype=int)
    try:
        for start in range(0, len(seeds), num_envs):
            wave = list(seeds[start : start + num_envs])
            real = len(wave)
            wave += [wave[-1]] * (num_envs - len(wave))  # pad the last wave; the extra episodes are dropped
            obs, _ = envs.reset(seed=wave)
            history = {k: np.repeat(obs[k][:, None], obs_horizon, axis=1) for k in obs_keys}
            # The padding sits the wave out (the sync env steps running environments only); the policy still sees
            # every row, so the real episodes' actions and noise are those of an unpadded call of the same shape.
            alive = np.arange(num_envs) < real
            steps = np.zeros(num_envs, dtype=int)
            won = np.zeros(num_envs, dtype=bool)
            while alive.any():
                chunk = policy(history)  # every row, finished ones too: the running rows' actions and noise stay as they were
                for k in range(chunk.shape[1]):
                    if single is not None:  # step the running environments only
                        terminated, truncated = np.zeros(num_envs, dtype=bool), np.zeros(num_envs, dtype=bool)
                        for i in np.flatnonzero(alive):
                            o, _, terminated[i], truncated[i], _ = single[i].step(chunk[i, k])
                            for key in obs_keys:
                                history[key][i] = np.concatenate([history[key][i, 1:], o[key][None]], axis=0)
                    else:
                        obs, _, terminated, truncated, _ = envs.step(chunk[:, k])
                        for key in obs_keys:
                            history[key] = np.concatenate([history[key][:, 1:], obs[key][:, None]], axis=1)
                    steps += alive
                    won |= alive & terminated
                    alive &= ~(terminated | truncated)
                    if not alive.any():
                        break
            n = min(num_envs, len(seeds) - start)
            success[start : start + n], length[start : start + n] = won[:n], steps[:n]
    finally:
        if own:
            envs.close()
    return {"success": success, "length": length}


@functools.cache
def _gym_wrapper():
    _quiet()
    import gymnasium as gym
    from robosuite.wrappers import GymWrapper

    class _RobomimicGym(GymWrapper):
        """robosuite's GymWrapper with robomimic's observation names and rollout protocol: seeded
        resets, terminated = the env's own success check, truncated at the horizon."""

        def __init__(self, meta, obs_keys, horizon, image_keys, image_size, fast_render=False, soft_reset=False):
            self.horizon, self.fast_render, self.renders = horizon, fast_render and bool(image_keys), bool(image_keys)
            env = make_env(meta, image_keys, image_size, hard_reset=not soft_reset)
            inverse = {v: k for k, v in ROBOSUITE_TO_ROBOMIMIC.items()}
            with warnings.catch_warnings():  # its float64 action Box: gymnasium warns about float32 casting
                warnings.simplefilter("ignore", UserWarning)
                super().__init__(env, keys=[inverse.get(k, k) for k in obs_keys], flatten_obs=False)
            self.action_space = gym.spaces.Box(*env.action_spec, dtype=np.float64)
            self.metadata, self.render_mode = {}, None
            sample = robomimic_obs(self._filter_obs(self.env._get_observations(force_update=True)))
            self.observation_space = gym.spaces.Dict({k: gym.spaces.Box(-np.inf, np.inf, np.shape(v), np.float64) if not is_image_key(k)
                                                      else gym.spaces.Box(0, 255, np.shape(v), np.uint8) for k, v in sample.items()})
            self.t = 0

        def reset(self, seed=None, options=None):
            if seed is not None:
                reseed(self.env, int(seed))
            self.t = 0
            if self.renders and self.env.hard_reset and not self.env.deterministic_reset:
                self._free_sim()
            raw = self.env.reset()
            if self.fast_render:  # the reset's renderer is new: set it up, and render the first frame again
                fast_rendering(self.env.sim)
                raw = self.env._get_observations(force_update=True)
            return robomimic_obs(self._filter_obs(raw)), {}

        def _free_sim(self):
            """Free the simulation and offscreen renderer that the coming hard reset replaces. robosuite 1.5
            frees them there only for renderer="mujoco" (environments/base.py, reset); with its default it
            drops them in reference cycles (~0.3 GB with two 84x84 cameras), which 10 rendering environments
            over a 70-episode evaluation grew to 13 GB per run (out of memory). MjrContext.free() deletes GL
            objects of whichever context is current, so this one is made current first: freed later by the
            collector, it deleted the live renderer's textures (black frames)."""
            ctx = getattr(self.env.sim, "_render_context_offscreen", None)
            if ctx is not None:
                ctx.gl_ctx.make_current()
            self.env._destroy_sim()  # robosuite's own: MjSim.free() (drops the render context, collects) and sim = None

        def step(self, action):
            raw, reward, _, info = self.env.step(action)
            self.t += 1
            success = bool(self.env._check_success())
            return robomimic_obs(self._filter_obs(raw)), reward, success, self.t >= self.horizon and not success, {**info, "success": success}

    return _RobomimicGym


def RobomimicGym(meta, obs_keys, horizon: int, image_keys=(), image_size: int = 84, fast_render: bool = False, soft_reset: bool = False):
    return _gym_wrapper()(meta, obs_keys, horizon, image_keys, image_size, fast_render, soft_reset)


def fast_rendering(sim) -> None:
    """Shadows, reflections and multisampling off in a robosuite sim's offscreen renderer: about 3.4x
    the frames per second with the software (llvmpipe) renderer here, the same scene with aliased
    edges and no shadows. robosuite re-creates the renderer at every (hard) reset, so this follows
    each reset; it reaches into robosuite's render context (no public setting exists in 1.5)."""
    import mujoco

    ctx = sim._render_context_offscreen
    ctx.gl_ctx.make_current()  # its con is rebuilt below, in whichever context is current: make it this sim's (robosuite's render assumes it)
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    if sim.model._model.vis.quality.offsamples:
        sim.model._model.vis.quality.offsamples = 0
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()


def write_expert_dataset(path, env_name: str, demos: int, val_demos: int, seed: int, noise: float, horizon: int, log=print) -> float:
    """Generate ``demos`` scripted-expert successes and write them in robomimic's layout with the
    filters mask/valid (the first ``val_demos``) and mask/train (the rest). Returns the expert's
    success rate over all attempts."""
    from .robomimic_data import write_demos

    if not 0 < val_demos < demos:
        raise ValueError(f"val_demos ({val_demos}) must be between 1 and demos - 1 ({demos - 1})")
    episodes, meta, rate = generate_demos(env_name, demos, seed, noise, horizon, log=log)
    names = [f"demo_{i}" for i in range(len(episodes))]
    write_demos(path, episodes, meta, {"train": names[val_demos:], "valid": names[:val_demos]})
    if log:
        lengths = [len(e["actions"]) for e in episodes]
        log(f"scripted expert success rate on {env_name}: {rate:.2f} ({len(episodes)} successes, noise {noise:g}, horizon {horizon}; "
            f"demo length {min(lengths)}-{max(lengths)} steps, median {int(np.median(lengths))}); wrote {path}")
    return rate
