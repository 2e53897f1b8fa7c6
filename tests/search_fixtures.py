"""Torch-free fixtures for the search tests: tiny hand-built ONNX exports, coloured images, subprocess helpers.

The tiny export is built with onnx.helper only, and is designed so that retrieval has a known answer:
  image model: GlobalAveragePool -> Flatten -> MatMul(W_img) -> L2 normalise, with mean 0 / std 1 preprocessing,
               so an image's embedding is its mean RGB colour (W_img = [I_3 | 0]).
  text model:  masked mean of text_embeds -> MatMul(W_txt) -> L2 normalise; the character table maps
               'r', 'g', 'b' to the red, green, blue directions (other rows: small noise),
               so the query "r" finds the reddest image, "b" the bluest.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OPSET = 17


def _normalise_nodes(x, out):
    return [helper.make_node("ReduceL2", [x], [x + "_n"], axes=[1], keepdims=1),
            helper.make_node("Max", [x + "_n", "eps"], [x + "_nc"]),
            helper.make_node("Div", [x, x + "_nc"], [out])]


def make_image_model(path, dim=4):
    w = np.zeros((3, dim), np.float32)
    w[:3, :3] = np.eye(3)
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["proj"])] + _normalise_nodes("proj", "embedding")
    g = helper.make_graph(nodes, "tiny_image",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, "H", "W"])],
                          [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(1e-12, np.float32), "eps")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def make_text_model(path, embed_dim=8, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    w = np.zeros((embed_dim, dim), np.float32)
    w[:3, :3] = np.eye(3)
    w[3:] = rng.normal(0, 0.05, (embed_dim - 3, dim))
    nodes = [helper.make_node("Unsqueeze", ["text_mask", "ax2"], ["m3"]),
             helper.make_node("Mul", ["text_embeds", "m3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "ax1"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["text_mask", "ax1"], ["cnt"], keepdims=1),
             helper.make_node("Max", ["cnt", "one"], ["cntc"]),
             helper.make_node("Div", ["s", "cntc"], ["mean"]),
             helper.make_node("MatMul", ["mean", "W"], ["proj"])] + _normalise_nodes("proj", "embedding")
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    g = helper.make_graph(nodes, "tiny_text",
                          [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["B", "L", embed_dim]),
                           helper.make_tensor_value_info("text_mask", TensorProto.FLOAT, ["B", "L"])],
                          [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def make_table(vocab_size=8192, embed_dim=8, seed=0):
    from search.charmap import char_row

    rng = np.random.default_rng(seed)
    t = rng.normal(0, 0.02, (vocab_size, embed_dim)).astype(np.float32)
    for k, ch in enumerate("rgb"):
        t[char_row(ord(ch), vocab_size)] = 0
        t[char_row(ord(ch), vocab_size), k] = 1.0
    return t


def make_export(out_dir, dim=4, embed_dim=8, vocab_size=8192, max_seq_length=16, image_size=(32, 16),
                text_dim=None, image=True, teacher_space=False, teacher="google/siglip2-base-patch16-224", seed=0):
    """A complete tiny export folder. text_dim != dim makes a deliberately mismatched text model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if image:
        make_image_model(out / "model_image.onnx", dim)
    make_text_model(out / "model_text.onnx", embed_dim, text_dim or dim, seed)
    np.save(out / "input_embeddings.pt.npy", make_table(vocab_size, embed_dim, seed))
    info = {"format_version": 1, "image_size": list(image_size), "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
            "max_seq_length": max_seq_length, "vocab_size": vocab_size, "embed_dim": embed_dim,
            "charmap_version": "cp-hash-v1", "feature_dim": text_dim or dim, "teacher_space": teacher_space,
            "teacher": teacher, "backbone": "tiny", "text_backbone": "tiny_mean",
            "image_model": "model_image.onnx" if image else None, "text_model": "model_text.onnx",
            "input_embeddings": "input_embeddings.pt.npy"}
    (out / "model_info.json").write_text(json.dumps(info, indent=1))
    return out


COLOURS = {"red": (230, 20, 20), "green": (20, 220, 30), "blue": (25, 30, 235), "yellow": (230, 220, 20),
           "white": (240, 240, 240), "purple": (150, 20, 200)}


def write_images(root, names=("red", "green", "blue"), size=(40, 80), sub="", fmt="png"):
    """One flat-coloured image per colour name under root/sub; returns the relative paths."""
    d = Path(root) / sub
    d.mkdir(parents=True, exist_ok=True)
    rels = []
    for n in names:
        p = d / f"{n}.{fmt}"
        Image.new("RGB", size, COLOURS[n]).save(p)
        rels.append(str(p.relative_to(root)).replace(os.sep, "/"))
    return rels


def write_split_image(path, left, right, size=(80, 80)):
    """Left half one colour, right half another: boxes over each half embed differently."""
    im = Image.new("RGB", size, COLOURS[left])
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), COLOURS[right]), (size[0] // 2, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "torchvision" or name.startswith("torchvision."):
            raise ImportError(f"torch is blocked in this test (import of {name})")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def no_torch_env(tmp_dir):
    """Environment whose Python refuses to import torch (a sitecustomize on PYTHONPATH)."""
    d = Path(tmp_dir) / "no_torch_site"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(d)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def run_py(args, cwd=None, env=None, timeout=120):
    """Run `python args...` and capture text output."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
