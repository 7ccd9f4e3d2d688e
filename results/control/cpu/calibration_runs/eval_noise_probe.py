# The probe behind control version 5 (docs/tasks/control.md): the final EMA weights of finished tuning runs of
# version 4 (noise-free evaluation), re-scored on the 20 evaluation episodes with execution noise 0, 0.1, 0.2, 0.3,
# and the committed expert under the same noise. Needs the runs' checkpoint.pt (not committed):
#   python results/control/cpu/calibration_runs/eval_noise_probe.py runs/control/tune/<run> ...
import json, sys, glob, torch, numpy as np
from omegaconf import OmegaConf
sys.path.insert(0, ".")
from experiments.tasks.control import BehaviourCloning, rollout_returns, load_expert
torch.set_num_threads(1)
noises = [0.0, 0.1, 0.2, 0.3]
seeds = [20_000 + i for i in range(20)]
exp = load_expert("Hopper-v5")
print("expert", [round(rollout_returns("Hopper-v5", lambda s: exp(s), seeds, action_noise=n, noise_seed=7)[0].mean()) for n in noises], flush=True)
for d in sys.argv[1:]:
    cfg = OmegaConf.create(json.load(open(f"{d}/config.json")))
    task = BehaviourCloning(cfg.task, 0, torch.device("cpu"))
    st = torch.load(f"{d}/checkpoint.pt", weights_only=False, map_location="cpu")["ema"]
    task.model.load_state_dict({k[len("module."):]: v for k, v in st.items() if k.startswith("module.")})
    task.model.eval()
    with torch.no_grad():
        r = [round(rollout_returns("Hopper-v5", lambda s: task.model(s), seeds, action_noise=n, noise_seed=7)[0].mean()) for n in noises]
    print(d.rstrip("/").split("/")[-1], r, flush=True)
