"""robomimic's hdf5 dataset layout, read and written with h5py (the robomimic package is not a
dependency: its PyPI release pins torchvision). The layout, as robomimic's datasets have it:

    data                      attrs: total (number of samples), env_args (JSON: env_name, type, env_kwargs)
    data/demo_<k>             attrs: num_samples
    data/demo_<k>/obs/<key>   (T, ...) per observation key: low-dim (T, d) float, images (T, H, W, 3) uint8
    data/demo_<k>/actions     (T, action_dim)
    data/demo_<k>/rewards     (T,)
    data/demo_<k>/dones       (T,)
    data/demo_<k>/states      (T, state_dim)  MuJoCo states, for replay
    mask/<filter>             demo names (bytes), e.g. mask/train and mask/valid

So the real robomimic datasets (Lift, Can, Square, Transport, Tool-Hang; PH/MH; low-dim and image)
load unchanged, and the suite's own generated demonstrations are in the same format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .checkpoint import atomic_path, file_lock

IMAGE_SUFFIX = "_image"  # robomimic's image observation keys: agentview_image, robot0_eye_in_hand_image, ...


def is_image_key(key: str) -> bool:
    return key.endswith(IMAGE_SUFFIX)


def _demo_order(names) -> list[str]:
    # demo_0, demo_1, ..., demo_10 (numeric order, as robomimic sorts them)
    return sorted(names, key=lambda n: int(re.sub(r"\D", "", n) or 0))


def env_meta(path: str | Path) -> dict:
    """The dataset's environment metadata: {"env_name", "type", "env_kwargs"}."""
    import h5py

    with h5py.File(_check(path), "r") as f:
        return json.loads(f["data"].attrs["env_args"])


def _check(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no robomimic dataset at {path}: generate the embedded one with `python scripts/robot_demos.py` "
                                f"or download a robomimic hdf5 (robomimic.github.io) and set task.dataset=<path>")
    return path


def read_demos(path: str | Path, obs_keys: list[str], filter_key: str | None = None, image_cache: str | Path | None = None,
               limit: int | None = None) -> list[dict]:
    """[{"obs": {key: (T, ...) array}, "actions": (T, action_dim) float32}] for the demos of the file,
    or of one filter (``mask/<filter_key>``), the first ``limit`` of them if given. Low-dim observations
    come back as float32, images as uint8 (T, H, W, 3).

    With ``image_cache`` (a folder), images are not read into memory: each image key of these demos is
    copied once, a few frames at a time, into an uncompressed ``.npy`` file there, and every demo's
    frames are a slice of its read-only memory map (only the frames a batch indexes are ever read).
    Each such demo also carries ``image_store`` = {key: (memory map of all demos, first row)}."""
    import h5py

    path = _check(path)
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path} is not in robomimic's layout (no 'data' group)")
        names = _demo_order(f["data"].keys())
        if filter_key is not None:
            if f"mask/{filter_key}" not in f:
                have = list(f["mask"].keys()) if "mask" in f else []
                raise ValueError(f"{path} has no filter mask/{filter_key} (it has {have or 'none'}): set task.train_filter/val_filter")
            names = _demo_order(n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][()])
        if not names:
            raise ValueError(f"{path} holds no demos{f' in mask/{filter_key}' if filter_key else ''}")
        names = names[:limit] if limit else names
        lazy = [k for k in obs_keys if is_image_key(k)] if image_cache is not None else []
        stores = {k: _image_memmap(f, path, names, k, Path(image_cache).expanduser()) for k in lazy}
        demos, row = [], 0
        for name in names:
            group = f[f"data/{name}"]
            missing = [k for k in obs_keys if k not in group["obs"]]
            if missing:
                raise ValueError(f"{path}:{name} has no observation {missing}; it has {sorted(group['obs'].keys())}: "
                                 f"set task.obs_keys to keys it has")
            obs = {k: group["obs"][k][()] for k in obs_keys if k not in stores}
            obs = {k: (v if is_image_key(k) else v.astype(np.float32).reshape(len(v), -1)) for k, v in obs.items()}
            actions = group["actions"][()].astype(np.float32)
            obs.update({k: store[row : row + len(actions)] for k, store in stores.items()})
            if any(len(v) != len(actions) for v in obs.values()):
                raise ValueError(f"{path}:{name}: observations and actions differ in length")
            demo = {"obs": obs, "actions": actions, "name": name}
            if stores:
                demo["image_store"] = {k: (store, row) for k, store in stores.items()}
            demos.append(demo)
            row += len(actions)
    return demos


def _image_memmap(f, path: Path, names: list[str], key: str, folder: Path) -> np.memmap:
    """A read-only memory map of ``key``'s frames of these demos, concatenated, from a ``.npy`` file in
    ``folder`` named by the dataset (path, size, mtime), the demos and the key; written once, a few
    frames at a time (memory stays one chunk), atomically, under a file lock for concurrent runs."""
    import hashlib

    stat = path.stat()
    ident = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, names, key])
    target = folder / f"{path.stem}-{key}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npy"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if not target.exists():
            first = f[f"data/{names[0]}/obs/{key}"]
            shape = (sum(len(f[f"data/{n}/obs/{key}"]) for n in names), *first.shape[1:])
            with atomic_path(target) as tmp, open(tmp, "wb") as out:
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(first.dtype)),
                                                           "fortran_order": False, "shape": shape})
                for n in names:
                    frames = f[f"data/{n}/obs/{key}"]
                    if frames.shape[1:] != first.shape[1:]:
                        raise ValueError(f"{path}:{n}/obs/{key} has frames of shape {frames.shape[1:]}, others {first.shape[1:]}")
                    for start in range(0, len(frames), 64):
                        out.write(np.ascontiguousarray(frames[start : start + 64]).tobytes())
    return np.load(target, mmap_mode="r")


def write_demos(path: str | Path, demos: list[dict], meta: dict, masks: dict[str, list[str]] | None = None) -> None:
    """Write demos ({"obs": {key: array}, "actions", "rewards", "dones", "states"}) as
    data/demo_<k> in robomimic's layout, atomically (a temporary file renamed over the target)."""
    import h5py

    with atomic_path(Path(path).expanduser()) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        total = 0
        for k, demo in enumerate(demos):
            g = data.create_group(f"demo_{k}")
            n = len(demo["actions"])
            g.attrs["num_samples"] = n
            if "seed" in demo:  # the episode's seed (generate_demos): the demo can be re-run, e.g. to render images
                g.attrs["seed"] = demo["seed"]
            for key, value in demo["obs"].items():
                g.create_dataset(f"obs/{key}", data=value, compression="gzip" if is_image_key(key) else None)
            for key in ("actions", "rewards", "dones", "states"):
                if key in demo:
                    g.create_dataset(key, data=demo[key])
            total += n
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(meta)
        for name, members in (masks or {}).items():
            f.create_dataset(f"mask/{name}", data=np.array(members, dtype="S"))
