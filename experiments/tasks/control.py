"""Behaviour cloning for continuous control (the paper's Humanoid-v5 experiment, here on a MuJoCo
task whose expert trains on a CPU): a residual MLP regresses the expert's action from the state
(one-step L2 loss) and is then rolled out in the environment, where its own errors move it to
states the expert never showed it (test-time feedback).

- Expert: a SAC policy trained by ``scripts/expert.py train`` and committed under
  ``experiments/assets/experts/`` (the actor network only), so demonstrations regenerate
  deterministically. Demonstrations: the expert acts (with a little Gaussian action noise,
  ``task.demo_action_noise``, for state diversity) and its noise-free action is the label.
  Paper scale can instead read a Minari dataset (``task.dataset=minari:<id>``; only local
  datasets, ``MINARI_DATASETS_PATH``).
- Validation loss: held-out expert episodes' action MSE.
- Rollout metric: mean return over ``task.eval_episodes`` episodes with fixed seeds in a gymnasium
  vector environment, optionally with Gaussian execution noise on the policy's actions
  (``task.eval_action_noise``, fixed noise seed; the expert's return under the same episodes and
  noise is recorded as ``expert_eval_return``); mean episode length; the return accumulated up to several horizons
  (``return_h<T>``); and the divergence between the state distribution of the expert's data and
  of the policy's rollouts (Prop 3.1 of the paper: test-time feedback is a covariance gap), as the
  Frechet distance between Gaussian fits (``state_fd``) and the relative Frobenius gap of the
  covariances (``state_cov_gap``), in standardised state coordinates.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint
from .base import EvalResult, Task, check_sizes, eval_mode, one_thread

EXPERT_DIR = Path(__file__).resolve().parents[1] / "assets" / "experts"


# ------------------------------------------------------------------------------------ expert
class ExpertActor(nn.Module):
    """stable-baselines3's SAC actor, deterministic: tanh(mu(latent_pi(obs))) scaled to the action
    box. Same parameter names as SB3, so its state dict loads as is; no SB3 import needed."""

    def __init__(self, obs_dim: int, act_dim: int, net_arch: list[int], low, high):
        super().__init__()
        layers, width = [], obs_dim
        for h in net_arch:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(width, act_dim)
        self.log_std = nn.Linear(width, act_dim)  # unused when acting deterministically
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32), persistent=False)
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        squashed = torch.tanh(self.mu(self.latent_pi(obs)))
        return self.low + (squashed + 1) * 0.5 * (self.high - self.low)


def load_expert(env_id: str, path: Path | None = None) -> ExpertActor:
    path = path or EXPERT_DIR / f"{env_id}_sac.pt"
    if not path.exists():
        raise FileNotFoundError(f"no expert for {env_id} at {path}: train one with `python scripts/expert.py train --env {env_id}` "
                                f"(or use task.dataset=minari:<dataset id> with a local Minari dataset)")
    state = load_checkpoint(path, "cpu")  # weights_only: the expert file holds tensors and plain values
    actor = ExpertActor(state["obs_dim"], state["act_dim"], state["net_arch"], state["action_low"], state["action_high"])
    actor.load_state_dict(state["state_dict"])
    return actor.eval()


def rollout_returns(env_id: str, policy, seeds: list[int], record: bool = False, action_noise: float = 0.0,
                    noise_seed: int = 0, max_steps: int | None = None):
    """Run ``policy`` (batched: (n, obs) tensor -> (n, act) tensor) for one episode per seed in a
    synchronous gymnasium vector environment. Returns (returns, lengths) and, with ``record``,
    per episode the (states, policy actions, rewards) arrays. With ``action_noise`` the executed
    action is the policy's plus Gaussian noise (clipped to the box); the recorded one is the policy's."""
    import gymnasium as gym

    n = len(seeds)
    envs = gym.make_vec(env_id, num_envs=n, vectorization_mode="sync")
    low, high = envs.single_action_space.low, envs.single_action_space.high
    obs, _ = envs.reset(seed=list(seeds))
    rng = np.random.default_rng(noise_seed)
    alive = np.ones(n, dtype=bool)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    traces = [([], [], []) for _ in range(n)] if record else None
    step = 0
    while alive.any() and (max_steps is None or step < max_steps):
        actions = policy(torch.as_tensor(obs, dtype=torch.float32)).cpu().numpy().astype(np.float64)
        executed = actions + action_noise * rng.standard_normal(actions.shape) if action_noise else actions
        executed = np.clip(executed, low, high)
        next_obs, rewards, terminated, truncated, _ = envs.step(executed)
        for i in np.flatnonzero(alive):
            returns[i] += rewards[i]
            lengths[i] += 1
            if record:
                traces[i][0].append(obs[i].copy())
                traces[i][1].append(actions[i].copy())
                traces[i][2].append(rewards[i])
        # gymnasium's vector envs reset a finished sub-env on the next step: stop counting it now
        alive &= ~(terminated | truncated)
        obs = next_obs
        step += 1
    envs.close()
    if record:
        episodes = [tuple(np.asarray(x, dtype=np.float32) for x in t) for t in traces]
        return returns, lengths, episodes
    return returns, lengths


# -------------------------------------------------------------------------------------- data
def expert_demonstrations(cfg, env_id: str, episodes: int, seed: int) -> list[tuple]:
    """[(states, actions)] per episode, generated from the committed expert and cached."""
    expert_path = EXPERT_DIR / f"{env_id}_sac.pt"
    key = {"env": env_id, "episodes": episodes, "seed": seed, "noise": cfg.demo_action_noise,
           "expert": expert_digest(expert_path) if expert_path.exists() else None, "generator": CACHE_GENERATOR}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cfg.data_dir).expanduser() / f"demos-{env_id}-{digest}.npz"
    if cache.exists():
        data = np.load(cache)
        return [(data[f"s{i}"], data[f"a{i}"]) for i in range(int(data["n"]))]
    expert = load_expert(env_id)
    seeds = [seed * 100_000 + i for i in range(episodes)]
    with one_thread():  # the expert's batched actions differ in the last bits with the thread count, the episodes then by whole states
        returns, _, eps = rollout_returns(env_id, expert, seeds, record=True, action_noise=cfg.demo_action_noise, noise_seed=seed)
    print(f"generated {episodes} expert episodes of {env_id} (return {returns.mean():.0f} ± {returns.std():.0f}); cached at {cache}", flush=True)
    import io

    buf = io.BytesIO()
    np.savez(buf, n=len(eps), **{f"s{i}": e[0] for i, e in enumerate(eps)}, **{f"a{i}": e[1] for i, e in enumerate(eps)})
    atomic_write_bytes(cache, buf.getvalue())
    return [(e[0], e[1]) for e in eps]


# Bumped when the way the cached demonstrations and expert returns are made changes their bits, so that
# caches are made again (2: on one thread, base.one_thread).
CACHE_GENERATOR = 2


def expert_digest(expert_path: Path) -> str:
    """The expert file's short hash: part of every cache key computed from the expert."""
    return hashlib.sha1(expert_path.read_bytes()).hexdigest()[:12]


def eval_noise(cfg) -> float:
    """task.eval_action_noise (absent or null: 0)."""
    return float(cfg.get("eval_action_noise") or 0.0)


def eval_seeds(cfg) -> list[int]:
    """The reported evaluation episodes' environment seeds (shared by every optimizer and run)."""
    return [20_000 + i for i in range(cfg.eval_episodes)]


def expert_eval_return(cfg, env_id: str, seeds: list[int]) -> float | None:
    """The committed expert's mean return on the evaluation episodes under the evaluation's execution noise
    (the ceiling a clone is measured against), computed once and cached beside the demonstrations."""
    expert_path = EXPERT_DIR / f"{env_id}_sac.pt"
    if not expert_path.exists():
        return None
    noise = eval_noise(cfg)
    key = {"env": env_id, "seeds": seeds, "noise": noise, "expert": expert_digest(expert_path), "generator": CACHE_GENERATOR}
    cache = Path(cfg.data_dir).expanduser() / f"expert-eval-{env_id}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.json"
    if cache.exists():
        return json.loads(cache.read_text())["mean_return"]
    with one_thread():
        returns, _ = rollout_returns(env_id, load_expert(env_id), seeds, action_noise=noise, noise_seed=seeds[0])
    atomic_write_text(cache, json.dumps({**key, "mean_return": float(returns.mean()), "returns": returns.tolist()}) + "\n")
    return float(returns.mean())


def minari_demonstrations(dataset_id: str) -> list[tuple]:
    """[(states, actions)] per episode of a local Minari dataset (observations[:-1], actions)."""
    try:
        import minari
    except ImportError:
        raise ImportError("task.dataset=minari:... needs the minari package: pip install minari") from None
    try:
        ds = minari.load_dataset(dataset_id)
    except Exception as err:
        raise FileNotFoundError(f"Minari dataset {dataset_id!r} is not on this machine ({err}); download it where there is "
                                f"network (minari download {dataset_id}) and point MINARI_DATASETS_PATH at it") from None
    return [(np.asarray(ep.observations[:-1], dtype=np.float32), np.asarray(ep.actions, dtype=np.float32)) for ep in ds.iterate_episodes()]


# ------------------------------------------------------------------------------------- model
class ResidualMLP(nn.Module):
    """in -> width, ``blocks`` x (LayerNorm -> Linear -> GELU -> Linear, plus skip), -> out. Inputs
    are standardised with the training data's mean and std (fixed buffers)."""

    def __init__(self, obs_dim: int, act_dim: int, width: int, blocks: int, mean, std):
        super().__init__()
        self.register_buffer("obs_mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(std, dtype=torch.float32))
        self.inp = nn.Linear(obs_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.inp((obs - self.obs_mean) / self.obs_std)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def gaussian_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Frechet distance between Gaussian fits of the rows of a and b, ||cov_b - cov_a||_F / ||cov_a||_F)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))
    return max(fd, 0.0), float(np.linalg.norm(s_b - s_a) / np.linalg.norm(s_a))


# -------------------------------------------------------------------------------------- task
class BehaviourCloning(Task):
    metric = "return"
    higher_is_better = True
    val_loss_label = "validation loss (action MSE)"
    metric_label = "return"
    horizon_label = "episode steps"
    # Prop 3.1's covariance gap between expert and policy states, plotted against the return by the report
    diagnostics = ("state_fd", "state_cov_gap")

    def __init__(self, cfg, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.report_meta = {"env": cfg.env}
        if cfg.dataset == "expert":
            record = EXPERT_DIR / f"{cfg.env}_sac.json"  # written by scripts/expert.py with the expert
            if record.exists():
                self.report_meta["expert_return"] = json.loads(record.read_text())["mean_return"]
            # the ceiling under the evaluation's own conditions: the expert on the reported episodes, same noise
            self.report_meta["eval_action_noise"] = eval_noise(cfg)
            self.report_meta["expert_eval_return"] = expert_eval_return(cfg, cfg.env, eval_seeds(cfg))
            train_eps = expert_demonstrations(cfg, cfg.env, cfg.train_episodes, seed=1)
            val_eps = expert_demonstrations(cfg, cfg.env, cfg.val_episodes, seed=2)
        elif str(cfg.dataset).startswith("minari:"):
            episodes = minari_demonstrations(cfg.dataset.split(":", 1)[1])
            n_val = max(1, len(episodes) // 10)
            train_eps, val_eps = episodes[n_val:], episodes[:n_val]
        else:
            raise ValueError(f"task.dataset={cfg.dataset!r}: use 'expert' (the committed expert's demonstrations) or 'minari:<dataset id>'")
        if cfg.get("demo_steps"):  # the data-limited regime: only the first demo_steps steps of each training episode
            train_eps = [(s[: cfg.demo_steps], a[: cfg.demo_steps]) for s, a in train_eps]
        self.train_s = torch.from_numpy(np.concatenate([e[0] for e in train_eps]))
        self.train_a = torch.from_numpy(np.concatenate([e[1] for e in train_eps]))
        self.val_s = torch.from_numpy(np.concatenate([e[0] for e in val_eps]))
        self.val_a = torch.from_numpy(np.concatenate([e[1] for e in val_eps]))
        mean, std = self.train_s.mean(0), self.train_s.std(0).clamp(min=1e-6)
        self.state_std = (mean, std)
        torch.manual_seed(seed)
        self.model = ResidualMLP(self.train_s.shape[1], self.train_a.shape[1], cfg.model.width, cfg.model.blocks,
                                 mean if cfg.normalize_obs else torch.zeros_like(mean),
                                 std if cfg.normalize_obs else torch.ones_like(std)).to(device)

    def train_batch(self, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.train_s), (self.cfg.batch_size,), generator=g)
        return self.train_s[idx].to(self.device), self.train_a[idx].to(self.device)

    def val_batches(self):
        b = self.cfg.eval_batch_size
        for i in range(0, len(self.val_s), b):
            yield self.val_s[i : i + b].to(self.device), self.val_a[i : i + b].to(self.device)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        states, actions = batch
        return F.mse_loss(model(states), actions)

    @torch.no_grad()
    def light_evaluate(self, model: nn.Module) -> EvalResult:
        """The budget axis's cheaper point: mean return over the first ``task.light_episodes`` reported episodes (the
        same seeds and execution noise for every optimizer), no selection episodes."""
        with eval_mode(model):
            seeds = eval_seeds(self.cfg)[: self.cfg.get("light_episodes") or self.cfg.eval_episodes]
            returns, lengths = rollout_returns(self.cfg.env, lambda s: model(s.to(self.device)), seeds,
                                               action_noise=eval_noise(self.cfg), noise_seed=seeds[0])[:2]
        return EvalResult({"return": float(returns.mean()), "episode_length": float(lengths.mean())})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = True) -> EvalResult:
        with eval_mode(model):
            # Fixed episodes and fixed execution noise (task.eval_action_noise; its seed is the episodes' first seed),
            # the same for every optimizer and every evaluation.
            noise, seeds = eval_noise(self.cfg), eval_seeds(self.cfg)
            returns, lengths, episodes = rollout_returns(self.cfg.env, lambda s: model(s.to(self.device)), seeds, record=True,
                                                         action_noise=noise, noise_seed=seeds[0])
            # Selection episodes (seeds 30000+, never reported) choose the best checkpoint.
            chosen = [30_000 + i for i in range(self.cfg.get("select_episodes") or 0)]
            select = rollout_returns(self.cfg.env, lambda s: model(s.to(self.device)), chosen, action_noise=noise,
                                     noise_seed=chosen[0])[0] if chosen else None
        out = {"return": float(returns.mean()), "episode_return_sd": float(returns.std()), "episode_length": float(lengths.mean())}
        outcomes = {"return": [round(float(r), 3) for r in returns], "episode_length": [int(n) for n in lengths]}  # per episode
        for h in self.cfg.horizons:
            out[f"return_h{h}"] = float(np.mean([e[2][:h].sum() for e in episodes]))
        if select is not None:
            out["select_return"] = float(select.mean())
        mean, std = (t.numpy() for t in self.state_std)
        expert_states = (self.val_s.numpy() - mean) / std
        policy_states = (np.concatenate([e[0] for e in episodes]) - mean) / std
        if len(policy_states) > 2:
            out["state_fd"], out["state_cov_gap"] = gaussian_gap(expert_states, policy_states)
        else:
            out["state_fd"] = out["state_cov_gap"] = math.inf
        return EvalResult(out, outcomes)


def build(cfg, seed: int, device: torch.device):
    check_sizes(cfg, {"batch_size": 1, "eval_batch_size": 1, "train_episodes": 1, "val_episodes": 1, "eval_episodes": 1, "select_episodes": 0,
                      "light_episodes": 1, "demo_steps": 1, "horizons": 1, "model.width": 1, "model.blocks": 0},
                nullable=("select_episodes", "demo_steps", "light_episodes"))
    return BehaviourCloning(cfg, seed, device)
