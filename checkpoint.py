"""The student checkpoint format: the one place it is written and read.

A checkpoint is a dict, self-contained so that evaluation and export rebuild the model from the file alone:

    {"model": state_dict, "model_cfg": dict,            # required: model.build_model(model_cfg) + load_state_dict
     "optimizer": ..., "scheduler": ..., "scaler": ..., "criterion": state_dict,
     "step": int, "args": dict, "rng": {"torch": ByteTensor, "cuda": ByteTensor?}, ...}

Every value must load with `torch.load(weights_only=True)`: plain dicts/lists/tuples, str/int/float/bool/None,
tensors, torch.dtype/device/Size. No argparse.Namespace, numpy arrays or numpy scalars (np.float64 is a float
subclass and still refused by the safe unpickler), no custom classes. `save_checkpoint` checks this BEFORE
writing, naming the offending key, so a bad object fails at save time instead of at the next resume.

Integrity: torch's zip reader checks no CRC, so a flipped bit in a weight loads silently. `save_checkpoint` stores
`state_hash` (blake2b over every tensor's bytes, dtype, shape and every other value, in key order) and
`load_checkpoint` recomputes it and refuses a file whose content changed. Files without the key (older ones) load.

Writes are atomic: torch.save to `<path>.tmp.<pid>` in the same folder, fsync, os.replace. A crash mid-save
leaves the previous file intact, never a half-written one.

    from checkpoint import save_checkpoint, load_checkpoint, CheckpointError
    save_checkpoint("logs/run/100.pt", {"model": m.state_dict(), "model_cfg": cfg, "step": 100, ...})
    ckpt = load_checkpoint("logs/run/100.pt")          # CheckpointError (a ValueError) with one clear line

    python checkpoint.py logs/run/last.pt              # prints the keys, step and model_cfg of a checkpoint
"""
import collections
import hashlib
import os
import pickle
import re
import sys
import warnings
import zipfile

import torch

from cli import fail

REQUIRED_KEYS = ("model", "model_cfg")

_LEAF_TYPES = (str, bytes, bytearray, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
_MAP_TYPES = (dict, collections.OrderedDict)
_SEQ_TYPES = (list, tuple, set)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file and the problem."""


def _unsafe_value(obj, where="checkpoint"):
    """Location + type name of the first value torch.load(weights_only=True) would refuse, or None."""
    stack = [(obj, where)]
    while stack:
        v, w = stack.pop()
        t = type(v)  # exact types on purpose: np.float64 subclasses float, namedtuples subclass tuple
        if isinstance(v, torch.Tensor) or t in _LEAF_TYPES:
            continue
        if t in _MAP_TYPES:
            for k, x in v.items():
                if type(k) not in _LEAF_TYPES:
                    return f"{w} has a key of type {t.__module__}.{type(k).__qualname__}"
                stack.append((x, f"{w}[{k!r}]"))
        elif t in _SEQ_TYPES:
            stack.extend((x, f"{w}[{i}]") for i, x in enumerate(v))
        else:
            return f"{w} is of type {t.__module__}.{t.__qualname__}"
    return None


HASH_KEY = "state_hash"


def state_hash(obj) -> str:
    """blake2b of a checkpoint's content (HASH_KEY itself excluded): tensors by bytes + dtype + shape, other values
    by repr, dict keys in sorted order, so the same state always hashes the same."""
    h = hashlib.blake2b(digest_size=20)
    stack = [("", obj)]
    while stack:
        where, v = stack.pop()
        h.update(where.encode("utf-8", "backslashreplace") + b"\0")
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(v.shape)}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
        elif isinstance(v, dict):
            keys = sorted((k for k in v if not (where == "" and k == HASH_KEY)), key=repr, reverse=True)
            h.update(b"D%d" % len(keys))
            for k in keys:
                stack.append((f"{where}[{k!r}]", v[k]))
        elif isinstance(v, (list, tuple)):
            h.update(b"L%d" % len(v))
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        else:
            h.update(repr(v).encode("utf-8", "backslashreplace"))
    return h.hexdigest()


def is_student_checkpoint(d) -> bool:
    """True for a dict with a `model` state_dict (name -> tensor) and a `model_cfg` dict."""
    return (isinstance(d, dict) and all(k in d for k in REQUIRED_KEYS) and isinstance(d["model_cfg"], dict)
            and isinstance(d["model"], dict) and len(d["model"]) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d["model"].items()))


def save_checkpoint(path, obj) -> None:
    """Atomically torch.save `obj` to `path` (tmp file in the same folder + fsync + os.replace)."""
    path = os.fspath(path)
    bad = _unsafe_value(obj)
    if bad is not None:
        raise CheckpointError(f"{path}: not saved: {bad}, which torch.load(weights_only=True) refuses; "
                              f"store plain dicts/lists/numbers/strings/tensors")
    if isinstance(obj, dict):
        obj = dict(obj)
        obj[HASH_KEY] = state_hash(obj)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem, hence best effort
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu", require_student=True) -> dict:
    """torch.load(weights_only=True) with one-line CheckpointError for every way a file can be unusable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted copy?)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    # torch.save writes a zip archive; files from torch < 1.6 are a raw pickle (first byte 0x80 = PROTO)
    if magic[:4] != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle; "
                              f"first bytes {magic!r})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for the user, the error says it
            warnings.simplefilter("ignore")
            d = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        what = f"a pickled {m.group(1)}" if m else "pickled Python objects"
        raise CheckpointError(f"{path}: contains {what}, which torch.load(weights_only=True) refuses; "
                              f"not a student checkpoint") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {first}") from None
    if isinstance(d, dict) and HASH_KEY in d and d[HASH_KEY] != state_hash(d):
        raise CheckpointError(f"{path}: content does not match its stored hash (the file is corrupted: bit flips "
                              f"on disk or in a copy); use another checkpoint")
    if require_student and not is_student_checkpoint(d):
        if isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values()):
            what = "a bare state_dict"
        elif isinstance(d, dict):
            keys = ", ".join(sorted(map(str, d))[:8])
            what = f"a dict with keys [{keys}]"
        else:
            what = f"a {type(d).__name__}"
        raise CheckpointError(f"{path}: not a student checkpoint ({what}; expected the dict main.py saves, "
                              f"with 'model' and 'model_cfg')")
    return d


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: python checkpoint.py <checkpoint.pt>")
    try:
        ck = load_checkpoint(sys.argv[1])
    except CheckpointError as e:
        fail(f"{e}")
    print(f"keys: {sorted(ck)}")
    print(f"step: {ck.get('step')}  tensors: {len(ck['model'])}  "
          f"params: {sum(v.numel() for v in ck['model'].values()) / 1e6:.3f}M")
    cfg = dict(ck["model_cfg"])
    if isinstance(cfg.get("query_vocab"), (list, tuple)):  # thousands of words: say how many, show a few
        qv = cfg["query_vocab"]
        cfg["query_vocab"] = f"<{len(qv)} words: {', '.join(map(str, qv[:8]))}{', ...' if len(qv) > 8 else ''}>"
    print(f"model_cfg: {cfg}")
