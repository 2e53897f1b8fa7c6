"""Export a trained student checkpoint to ONNX for search/ (DESIGN.md §8, docs/INTERFACES.md "Export").

    python export_model.py logs/expModel-res_tiny-224x112-512/1/last.pt logs/expModel-res_tiny-224x112-512/1/
    python export_model.py <checkpoint> <output_dir> --fp16 --int8          # also *.fp16.onnx and *.int8.onnx
    python export_model.py <checkpoint> <output_dir> --static_shapes --batch 1 --text_length 64 --int8  # NPUs
    python export_model.py <checkpoint> <output_dir> --no_simplify --opset 17 --batch_check 4 --atol 1e-4

Writes into <output_dir>:
    model_image.onnx         input `image` float32 [B,3,H,W] (dynamic B)          -> `embedding` [B,D] unit norm
                             (not written for a --text_only checkpoint; model_info.json says null)
    model_text.onnx          inputs `text_embeds` float32 [B,L,E], `text_mask` float32 [B,L] (1 = char, 0 = pad;
                             dynamic B and L)                                     -> `embedding` [B,D] unit norm
    input_embeddings.pt.npy  float32 [V,E]: the text tower's character table, looked up OUTSIDE the graph by
                             search/charmap.py (NPU runtimes often lack Embedding/Gather)
    query_bank.npy           float16 [N,D]: the student's embeddings of query-like texts of training identities, for
                             the hubness correction of search/ (search/hubness.py; --query_bank records, 0: none)
    model_info.json          image size, mean/std, max_seq_length, charmap version, dims, teacher space, files

What it does, in order:
  1. Rebuilds the model from the checkpoint alone (model.build_model(ckpt["model_cfg"]), strict state_dict),
     eval mode; refuses anything that is not a student checkpoint (exit 2, one line).
  2. Folds re-parameterisable branches / BatchNorm (backbone.reparameterize_model) and checks the folded
     PyTorch model against the unfolded one.
  3. Exports each tower with the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): on these
     graphs it is an order of magnitude faster than the dynamo exporter, honours opset 17 (dynamo in torch 2.14 emits >= 18 and
     fails to down-convert), and gives a single self-contained file with dynamic B/L via `dynamic_axes`. The
     dynamo exporter (`dynamic_shapes`) is the automatic fallback if the TorchScript one fails or is gone
     (`--exporter dynamo` forces it).
  4. Simplifies with onnxsim and onnxslim and keeps the graph with fewer nodes (either one is the other's
     fallback; --simplifier picks one, --no_simplify skips), then checks the graph contract: names, dtypes,
     dynamic axes, and no Gather reading a graph input (data or indices) in the text graph.
  5. Verifies ONNX Runtime against PyTorch on real inputs: a few dataset images (args["data"] of the checkpoint;
     deterministic synthetic images when it is gone) at batch 1 and --batch_check, and mixed English/Chinese/
     emoji/never-seen-character captions through search.charmap.encode_batch + numpy lookup into the exported
     table (exactly what search/ does) against PyTorch encode_text(ids, mask), at L = max_seq_length and at a
     shorter L. Fails (exit 1) when min cosine < 0.9999 or max |diff| > --atol.
  6. Only then writes the files (each atomically: tmp + os.replace; model_info.json last, so a folder with a
     model_info.json always holds a complete, verified export) and prints `export to "<path>" OK.` with the
     op-count table (Original vs Simplified Model, Model Size).
--fp16: onnxruntime's float16 converter, graph I/O kept float32, the final L2-normalisation kept float32 (its
sum of squares can overflow fp16), plus input_embeddings.fp16.npy.
--int8: calibrated static quantisation of both graphs (to_int8: onnxruntime quantize_static, QDQ, per-channel
symmetric int8 weights, int8 activations with ranges from --calib_size training-split images (search/'s
preprocessing) and captions (charmap + table; half cut to short prefixes)), plus input_embeddings.int8.npz
(search/charmap.py defines the table formats). Needs the training data (the checkpoint's --data, or --data).
Each variant is verified against PyTorch on the check inputs (--fp16_min_cos, --int8_min_cos) and, when the data
is there, against the fp32 graphs on held-out ids through the search path: min cos on images and captions, and
text->image R@1 within --max_r1_drop points (heldout_parity). It prints a fp32 / fp16 / int8 table (sizes, ORT
latency at batch 1, parity, R@1); a variant that misses a bound is not written and the exit code is 1.
--static_shapes [--batch B] [--text_length L]: fixed-shape graphs ([B,3,H,W], [B,L,E] / [B,L]); after onnxsim,
static_cleanup turns Constant nodes into initializers and Unsqueeze into Reshape and fails if any
Shape/Gather/Slice/Concat plumbing is left. model_info.json records "static_shapes" and "input_shapes".
Op report: every written graph's op counts and the ops outside NPU_OPS (a conservative NPU op list) are printed
and stored in model_info.json ("ops", "outside_npu_list"); tools/op_lists.py turns them into the README's lists.
"""
import argparse
import contextlib
import copy
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from search.query_words import QUERY_VOCAB_FILE, QueryVocab, QueryVocabError
from search import hubness

IMAGE_FILE, TEXT_FILE = "model_image.onnx", "model_text.onnx"
TABLE_FILE, INFO_FILE = "input_embeddings.pt.npy", "model_info.json"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Verification captions: English, Chinese, mixed, emoji, rare CJK (extension B), scripts no caption dataset has
# (so their rows were never trained), control/zero-width characters, an empty text, and one longer than
# max_seq_length (exercises truncation).
CHECK_TEXTS = [
    "a man wearing a black shirt, blue jeans and white shoes, carrying a backpack",
    "一个穿着红色外套和黑色裤子的女人，背着一个包",
    "woman in a pink dress 👗 with long black hair 长发 and sandals",
    "𠀋𠀍𪚥 ꙮ Ωμέγα ∑∫ ☃︎ 🧑‍🚀🏳️‍🌈 ᚠᛇᚻ ꦲꦏ ⵣ",
    "",
    "\tA  GIRL\u200b IN A ＹＥＬＬＯＷ\u3000coat\n",
    "он одет в серую куртку; 그는 회색 재킷을 입고 있다; هو يرتدي سترة رمادية",
    "the person is wearing " + "a very long description, " * 12 + "the end",
]


class ExportFailure(Exception):
    """Stops the export with one line on stderr and an exit code (1 = verification, 2 = unusable input)."""

    def __init__(self, msg, code=1):
        super().__init__(msg)
        self.code = code


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("Export a student checkpoint to ONNX for search/", add_help=add_help)
    p.add_argument("checkpoint", help="a .pt written by main.py (needs 'model' and 'model_cfg')")
    p.add_argument("output_dir", help="folder for model_image.onnx, model_text.onnx, input_embeddings.pt.npy, "
                                      "model_info.json (created if needed)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (the dynamo fallback needs >= 18)")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="auto = TorchScript exporter, dynamo if that fails")
    p.add_argument("--fp16", action="store_true",
                   help="also write model_*.fp16.onnx (float32 I/O) and the fp16 character table")
    p.add_argument("--int8", action="store_true",
                   help="also write model_*.int8.onnx: calibrated static quantisation (ONNX Runtime quantize_static, "
                        "QDQ, per-channel int8 weights) on the training data, plus the int8 character table; "
                        "written only when it passes the held-out parity check (see --int8_min_cos, --max_r1_drop)")
    p.add_argument("--static_shapes", action="store_true",
                   help="fixed-shape graphs (NPU compilers): image [--batch,3,H,W], text [--batch,--text_length,E], "
                        "simplified until no Shape/Gather/Slice/Concat/Unsqueeze plumbing is left")
    p.add_argument("--batch", type=int, default=None, help="static batch size (with --static_shapes; default 1)")
    p.add_argument("--text_length", type=int, default=None,
                   help="static text length in tokens incl. CLS (with --static_shapes; default max_seq_length); "
                        "search/ pads or truncates queries to it")
    p.add_argument("--data", default=None,
                   help="dataset JSON for --int8 calibration (train split) and parity (held-out ids); default: the "
                        "checkpoint's training --data")
    p.add_argument("--image_root", default=None, help="image root for --data (default: the checkpoint's)")
    p.add_argument("--query_bank", type=int, default=3000,
                   help="training records whose captions, composed captions and augmented texts make the query bank "
                        "of search/'s hubness correction (query_bank.npy, search/hubness.py); 0: no bank (search "
                        "ranks by raw cosine). Needs --data or the checkpoint's training data")
    p.add_argument("--calib_size", type=int, default=256,
                   help="--int8: calibration images and captions from the training split (each)")
    p.add_argument("--parity_size", type=int, default=1000,
                   help="--int8/--fp16: at most this many held-out images (and their English captions) for parity")
    p.add_argument("--calibrate_method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="--int8 activation range calibration (onnxruntime.quantization.CalibrationMethod)")
    p.add_argument("--max_r1_drop", type=float, default=1.0,
                   help="--int8/--fp16: held-out text->image R@1 may differ from fp32 by at most this many points "
                        "(or by one query, when there are fewer than 100 / max_r1_drop queries)")
    p.add_argument("--no_simplify", action="store_true", help="skip onnxsim/onnxslim")
    p.add_argument("--simplifier", choices=["auto", "onnxsim", "onnxslim"], default="auto",
                   help="auto = run both, keep the graph with fewer nodes (the other is the fallback if one fails)")
    p.add_argument("--batch_check", type=int, default=4, help="batch size of the second verification batch")
    p.add_argument("--atol", type=float, default=1e-4, help="max |ORT - PyTorch| allowed on fp32 embeddings")
    p.add_argument("--min_cos", type=float, default=0.9999, help="min cosine(ORT, PyTorch) for fp32 graphs")
    p.add_argument("--fp16_min_cos", type=float, default=0.999, help="min cosine for the fp16 variants")
    p.add_argument("--int8_min_cos", type=float, default=0.99,
                   help="min cosine of the int8 variants, to PyTorch on the check inputs and to fp32 ONNX on the "
                        "held-out images and captions")
    return p


# ------------------------------------------------------------------------------------------------ small utils
def _first_line(e, n=200):
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:n]


def _atomic_write(path, data: bytes):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _mib(n_bytes):
    return f"{n_bytes / 2**20:.2f}MiB"


def _compare(ref, out):
    """(max |diff|, min cosine over rows) between two [B,D] arrays."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ExportFailure(f"output shape {out.shape} != PyTorch {ref.shape}")
    if not np.isfinite(out).all():
        return float("inf"), -1.0
    cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-12)
    return float(np.abs(ref - out).max()), float(cos.min())


# ------------------------------------------------------------------------------------------------ model
def load_model(ckpt_path):
    """-> (eval model, model_cfg, train args dict). ExportFailure(code 2) for anything unusable."""
    import torch
    from checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        raise ExportFailure(str(e), 2) from None
    cfg = ckpt["model_cfg"]
    try:
        from model import build_model
        model = build_model(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise ExportFailure(f"{ckpt_path}: cannot rebuild the model from its model_cfg: {_first_line(e)}", 2) from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ExportFailure(f"{ckpt_path}: weights do not match the model its model_cfg describes: {msg[:300]}",
                            2) from None
    model.eval()
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    return model, cfg, args


def find_input_embeddings(model):
    import torch.nn as nn
    embs = [m for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] == "input_embeddings" and isinstance(m, nn.Embedding)]
    if len(embs) != 1:
        raise ExportFailure(f"expected exactly one text-tower `input_embeddings` nn.Embedding, found {len(embs)}", 2)
    return embs[0]


def make_wrappers(model):
    """Graph-shaped nn.Modules: their forward argument names become the ONNX input names."""
    import torch.nn as nn

    class ImageGraph(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):
            return self.m.encode_image(image)

    class TextGraph(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, text_embeds, text_mask):
            return self.m.encode_text_embedded(text_embeds, text_mask)

    return ImageGraph(model).eval(), TextGraph(model).eval()


# ------------------------------------------------------------------------------------------------ inputs
def synthetic_images(n, seed=0):
    """Deterministic person-ish PIL images of varied sizes: noisy background, body/legs/head blocks."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        w, h = int(rng.randint(48, 160)), int(rng.randint(96, 320))
        bg = (rng.rand(h, w, 3) * 60 + rng.randint(0, 190, 3)).astype(np.uint8)
        im = Image.fromarray(bg, "RGB")
        d = ImageDraw.Draw(im)
        c = lambda: tuple(int(v) for v in rng.randint(0, 256, 3))  # noqa: E731
        cx = w // 2
        d.ellipse([cx - w // 8, h // 20, cx + w // 8, h // 20 + h // 8], fill=c())            # head
        d.rectangle([cx - w // 4, h // 5, cx + w // 4, h // 2], fill=c())                      # upper body
        d.rectangle([cx - w // 4, h // 2, cx + w // 4, int(h * 0.9)], fill=c())                # lower body
        d.rectangle([cx - w // 4, int(h * 0.9), cx + w // 4, h - 2], fill=c())                 # shoes
        if i % 2:
            d.rectangle([cx + w // 4, h // 3, cx + w // 3 + 4, h // 2], fill=c())              # carried item
        out.append((f"synthetic_{i}", im))
    return out


def verification_images(train_args, cfg, n):
    """-> (float32 [n,3,H,W], source description). Dataset images via data.py when the checkpoint's
    args['data'] still exists; synthetic ones otherwise (said in the description)."""
    size = tuple(int(v) for v in cfg.get("image_size", (224, 112)))
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    from search.engine import preprocess as search_preprocess

    items, src, tf = [], None, None
    data_json = train_args.get("data")
    if data_json and os.path.isfile(str(data_json)):
        try:
            import data as data_lib
            records = data_lib.load_records(data_json, train_args.get("image_root"))
            step = max(1, len(records) // (4 * n))  # spread over the dataset, deterministic
            for r in records[::step][: 8 * n]:
                im = data_lib.load_image(r["image_path"])
                if im is not None:
                    items.append((r["file_path"], im))
                if len(items) == n:
                    break
            tf = data_lib.build_transform(size, train=False, mean=mean, std=std)
            src = f"{len(items)} images from {data_json}"
        except Exception as e:  # any data.py / dataset problem only downgrades the check to synthetic images
            items, tf = [], None
            src = f"synthetic images ({data_json}: {_first_line(e, 120)})"
    elif data_json:
        src = f"synthetic images (training data {data_json} not found)"
    else:
        src = "synthetic images (checkpoint args name no dataset)"
    if len(items) < n:
        extra = synthetic_images(n - len(items))
        if items:
            src += f" + {len(extra)} synthetic"
        items += extra
    arrs = [search_preprocess(im, None, size, mean, std) for _, im in items]
    x = np.stack(arrs).astype(np.float32)
    if tf is not None:  # training eval transform must equal search/ preprocessing (DESIGN §1, INTERFACES data.py)
        xt = np.stack([tf(im).numpy() for _, im in items])
        d = float(np.abs(xt - x).max())
        print(f"preprocessing check, data.build_transform vs search/ numpy: max|diff| = {d:.2e}"
              + ("" if d < 1e-3 else "  WARNING: training and search see different pixels"))
    return x, src


def query_bank(args, model, cfg, train_args, data_json, text_only):
    """float32 [N,D] unit rows (evaluation_model.query_bank over the training identities of the data) or None,
    with one line saying which. A missing dataset only leaves the bank out: search then ranks by raw cosine."""
    if args.query_bank < 0:
        raise ExportFailure(f"--query_bank must be >= 0, got {args.query_bank}", 2)
    if args.query_bank == 0 or text_only:  # a text-only model's gallery is enrolled by the teacher: no hub scores
        return None
    if not data_json or not os.path.isfile(str(data_json)):
        if args.data:
            raise ExportFailure(f"--data {args.data}: not found", 2)
        why = f"the training data {data_json} is not there" if data_json else "the checkpoint names no training data"
        print(f"query bank: none ({why}; pass --data to build one) -- search will rank by raw cosine")
        return None
    from evaluation_model import training_query_bank
    try:
        bank, n_train = training_query_bank(model, cfg, data_json, train_args, args.query_bank, args.image_root)
    except (OSError, ValueError) as e:
        raise ExportFailure(f"--data {data_json}: {_first_line(e)}", 2) from None
    if len(bank) == 0:
        print(f"query bank: none ({data_json} has no training captions)")
        return None
    print(f"query bank: {len(bank)} texts of {min(args.query_bank, n_train)} training records of {data_json}")
    return bank


def verification_texts(n):
    return [CHECK_TEXTS[i % len(CHECK_TEXTS)] for i in range(n)]


# ------------------------------------------------------------------------------------------------ export
def _torchscript_export(module, inputs, f, input_names, dynamic_axes, opset):
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module, inputs, f, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=["embedding"], dynamic_axes=dynamic_axes, do_constant_folding=True)
    tracer = sorted({_first_line(w.message, 160) for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    for t in tracer:  # a TracerWarning can mean a shape got frozen; the two-L / two-B verification catches that
        print(f"  tracer warning: {t}")


def _dynamo_export(module, inputs, f, input_names, dyn, opset):
    import torch
    shapes = {name: {ax: torch.export.Dim(dname, **({"max": mx} if mx else {})) for ax, (dname, mx) in axes.items()}
              for name, axes in dyn.items()} or None  # None: static shapes
    # one Dim object per axis name, shared across inputs (B and L are the same for text_embeds and text_mask)
    dims = {}
    for name, axes in dyn.items():
        for ax, (dname, mx) in axes.items():
            dims.setdefault(dname, shapes[name][ax])
            shapes[name][ax] = dims[dname]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(module, inputs, f, dynamo=True, opset_version=max(opset, 18), input_names=input_names,
                              output_names=["embedding"], dynamic_shapes=shapes, external_data=False)
        finally:
            logging.disable(logging.NOTSET)


def export_graph(module, inputs, input_names, dyn, opset, exporter):
    """-> (onnx.ModelProto, exporter description). dyn: {input: {axis: (name, max|None)}}."""
    import onnx
    with tempfile.TemporaryDirectory() as td:
        f = os.path.join(td, "graph.onnx")
        errors = []
        order = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"], "dynamo": ["dynamo"]}[exporter]
        for kind in order:
            try:
                if kind == "torchscript":
                    axes = {k: {a: n for a, (n, _) in v.items()} for k, v in dyn.items()}
                    if axes:  # static shapes: no dynamic axis anywhere, the output's batch included
                        axes["embedding"] = {0: "batch"}
                    _torchscript_export(module, inputs, f, input_names, axes or None, opset)
                    desc = f"TorchScript exporter (dynamo=False), opset {opset}"
                else:
                    _dynamo_export(module, inputs, f, input_names, dyn, opset)
                    desc = f"dynamo exporter (dynamic_shapes), opset {max(opset, 18)}"
                proto = onnx.load(f)
                onnx.checker.check_model(proto)
                if errors:
                    desc += f" (TorchScript exporter failed: {errors[0]})"
                return proto, desc
            except Exception as e:
                errors.append(f"{kind}: {_first_line(e, 160)}")
        raise ExportFailure("ONNX export failed: " + "; ".join(errors))


def _run_onnxsim(proto):
    import onnxsim
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        simp, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return simp


def _run_onnxslim(proto):
    import onnxslim
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return onnxslim.slim(copy.deepcopy(proto))


def simplify(proto, tool):
    """-> (model, description). tool: none | onnxsim | onnxslim | auto (run both, keep the graph with fewer
    nodes: on the text graph onnxsim rewrites each 3-D Linear as Reshape->Gemm->Reshape with extra dynamic
    Shape/Slice, onnxslim keeps MatMul+Add; fewer, static-shape-friendly nodes is what NPU compilers want).
    Either failing falls back to the other; ORT verification of the result follows anyway."""
    if tool == "none":
        return proto, "not simplified (--no_simplify)"
    import onnx
    runners = {"onnxsim": _run_onnxsim, "onnxslim": _run_onnxslim}
    order = ["onnxsim", "onnxslim"] if tool == "auto" else [tool, *(t for t in runners if t != tool)]
    results, notes = [], []
    for name in order:
        try:
            simp = runners[name](proto)
            onnx.checker.check_model(simp)
            results.append((len(simp.graph.node), name, simp))
            if tool != "auto":
                break
        except Exception as e:
            notes.append(f"{name} failed: {_first_line(e, 120)}")
    if not results:
        print(f"  warning: graph left unsimplified ({'; '.join(notes)})")
        return proto, "not simplified (" + "; ".join(notes) + ")"
    n_nodes, name, simp = min(results, key=lambda r: r[0])  # stable: ties keep the first (onnxsim)
    desc = f"simplified with {name}: {len(proto.graph.node)} -> {n_nodes} nodes"
    if len(results) > 1:
        desc += " (" + ", ".join(f"{r[1]} {r[0]}" for r in results) + ")"
    if notes:
        desc += " (" + "; ".join(notes) + ")"
    return simp, desc


def op_counts(proto):
    return Counter(n.op_type for n in proto.graph.node)


def gathers_on_inputs(proto):
    """Gather-family nodes reading a graph input directly, as data OR as indices. An nn.Embedding exports as
    Gather(data=table initializer, indices=ids input), so checking the data input alone would miss exactly
    the lookup this guards against; Shape->Gather (reading sizes) is fine and not matched."""
    inputs = {i.name for i in proto.graph.input}
    return [n.name or n.op_type for n in proto.graph.node
            if n.op_type in ("Gather", "GatherElements", "GatherND") and any(t in inputs for t in n.input)]


# A conservative op list: what NPU compilers for phones and embedded boards (vendor toolchains for Arm NPUs, Qualcomm
# HTP, Rockchip/Amlogic/MediaTek NPUs, TFLite's builtin ops) commonly run without CPU fallback. The op report marks
# every graph op outside it; the README's op lists are generated from that report (tools/op_lists.py).
NPU_OPS = frozenset("""
    Conv Relu Clip Add Sub Mul Div Sqrt MaxPool AveragePool GlobalAveragePool Gemm MatMul ReduceSum ReduceMean
    Softmax LayerNormalization Reshape Transpose Flatten Split QuantizeLinear DequantizeLinear
""".split())
# shape plumbing that a static-shape graph must not contain (an NPU compiler wants constants there)
PLUMBING_OPS = frozenset("Shape Gather Slice Concat Unsqueeze Squeeze ConstantOfShape Expand Range Constant".split())


def op_report(proto):
    """{"ops": {op: count} sorted by name, "outside_npu_list": [ops not in NPU_OPS]} of one graph."""
    c = op_counts(proto)
    return {"ops": {k: c[k] for k in sorted(c)}, "outside_npu_list": sorted(k for k in c if k not in NPU_OPS)}


def format_op_report(name, rep):
    bad = rep["outside_npu_list"]
    return (f"[{name}] op set ({len(rep['ops'])}): " + ", ".join(f"{k} {v}" for k, v in rep["ops"].items())
            + ("; all in the conservative NPU list" if not bad else f"; outside the NPU list: {', '.join(bad)}"))


def static_cleanup(proto):
    """Finish a fixed-shape graph for NPU compilers, in place: Constant nodes become initializers, and each
    Unsqueeze/Squeeze (left by broadcasting a [B,L] mask) becomes a Reshape to its inferred static shape. Then
    ExportFailure if any Shape/Gather/Slice/Concat/... plumbing remains (simplification should have folded it)."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    g = proto.graph
    for n in [n for n in g.node if n.op_type == "Constant"]:
        val = next((a for a in n.attribute if a.name == "value"), None)
        if val is None:
            continue
        t = onnx.TensorProto()
        t.CopyFrom(val.t)
        t.name = n.output[0]
        g.initializer.append(t)
        g.node.remove(n)
    shapes = {}
    inferred = shape_inference.infer_shapes(proto)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if dims and all(d is not None for d in dims):
            shapes[vi.name] = dims
    for i, n in enumerate(list(g.node)):
        if n.op_type in ("Unsqueeze", "Squeeze") and n.output[0] in shapes:
            sname = f"{n.output[0]}__static_shape"
            g.initializer.append(numpy_helper.from_array(np.array(shapes[n.output[0]], np.int64), sname))
            r = helper.make_node("Reshape", [n.input[0], sname], list(n.output), name=(n.name or f"reshape_{i}"))
            g.node.insert(list(g.node).index(n), r)
            g.node.remove(n)
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used]:  # e.g. the replaced Unsqueezes' axes
        g.initializer.remove(t)
    left = sorted({n.op_type for n in g.node} & PLUMBING_OPS)
    if left:
        raise ExportFailure(f"static-shape graph still has shape plumbing ({', '.join(left)}) after simplification")
    onnx.checker.check_model(proto)
    return proto


def check_contract(proto, spec, what):
    """spec: {input_name: [dim, ...]} with int (static) or str (must be dynamic); float32 I/O, output embedding."""
    import onnx
    ins = {i.name: i for i in proto.graph.input}
    if list(ins) != list(spec):
        raise ExportFailure(f"{what}: graph inputs {list(ins)} != {list(spec)}")
    for name, want in spec.items():
        tt = ins[name].type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT:
            raise ExportFailure(f"{what}: input {name} is not float32")
        dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                for d in tt.shape.dim]
        for got, exp in zip(dims, want):
            if isinstance(exp, str) and isinstance(got, int):
                raise ExportFailure(f"{what}: input {name} dims {dims}: axis meant to be dynamic is fixed")
            if isinstance(exp, int) and got != exp:
                raise ExportFailure(f"{what}: input {name} dims {dims}, expected {want}")
    outs = [o.name for o in proto.graph.output]
    if outs != ["embedding"] or proto.graph.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ExportFailure(f"{what}: graph outputs {outs}, expected one float32 'embedding'")


def print_op_table(name, orig, simp, orig_bytes, simp_bytes):
    """The seed's table: op counts of the original vs the simplified graph, plus file size."""
    co, cs = op_counts(orig), op_counts(simp)
    rows = [(op, str(co.get(op, 0)), str(cs.get(op, 0))) for op in sorted(set(co) | set(cs))]
    rows.append(("Model Size", _mib(orig_bytes), _mib(simp_bytes)))
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        t = Table(box=box.HEAVY_HEAD)
        for col in ("", "Original Model", "Simplified Model"):
            t.add_column(col)
        for r in rows:
            t.add_row(*r)
        Console(width=100, force_terminal=False, color_system=None).print(t)
    except ImportError:  # rich is in requirements.txt; a plain table keeps the script usable without it
        print(f"{'':<28}{'Original Model':>16}{'Simplified Model':>18}")
        for r in rows:
            print(f"{r[0]:<28}{r[1]:>16}{r[2]:>18}")


# ------------------------------------------------------------------------------------------------ ORT
def ort_session(model_bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def verify(model_bytes, cases, min_cos, atol, label, show_stats=False):
    """cases: list of (name, feeds dict, reference [B,D]). Prints one line per case; -> worst (max_abs, min_cos)."""
    try:
        sess = ort_session(model_bytes)
    except Exception as e:
        raise ExportFailure(f"{label}: onnxruntime cannot load the graph: {_first_line(e)}")
    worst_abs, worst_cos, bad = 0.0, 1.0, []
    for name, feeds, ref in cases:
        try:
            out = sess.run(["embedding"], feeds)[0]
        except Exception as e:
            raise ExportFailure(f"{label}: onnxruntime failed on {name}: {_first_line(e)}")
        mx, mc = _compare(ref, out)
        norms = np.linalg.norm(out.astype(np.float64), axis=1)
        tol_ok = mc >= min_cos and (atol is None or mx <= atol)
        print(f"  {label:<22} {name:<34} max|diff| = {mx:.2e}  min cos = {mc:.6f}  "
              f"|emb| in [{norms.min():.4f}, {norms.max():.4f}]{'' if tol_ok else '  <-- FAIL'}")
        if show_stats:
            print(f"  output[{out.shape[0]}, {out.shape[1]}]: min={out.min():.5f}, max={out.max():.5f}")
        if not tol_ok:
            bad.append(name)
        if np.isfinite(norms).all() and np.abs(norms - 1).max() > max(1e-3, 10 * (atol or 0)):
            bad.append(f"{name} (not unit norm)")
        worst_abs, worst_cos = max(worst_abs, mx), min(worst_cos, mc)
    if bad:
        lim = f"min cos >= {min_cos}" + (f", max|diff| <= {atol}" if atol is not None else "")
        return worst_abs, worst_cos, (f"{label}: ONNX Runtime differs from PyTorch on {', '.join(bad)} "
                                      f"(min cos {worst_cos:.6f}, max|diff| {worst_abs:.2e}; needs {lim})")
    return worst_abs, worst_cos, None


# ------------------------------------------------------------------------------------------------ variants
def _tail_after_last_matmul(proto):
    """Names of the nodes between the last MatMul/Gemm/Conv and the output: the L2-normalisation, whose sum of
    squares overflows fp16 for large pre-norm features; the fp16 converter keeps them float32."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    names, stack, seen = [], [o.name for o in proto.graph.output], set()
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in seen or n.op_type in ("MatMul", "Gemm", "Conv"):
            continue
        seen.add(id(n))
        names.append(n.name)
        stack.extend(n.input)
    return [n for n in names if n]


def _toposort(graph):
    """Reorder graph.node topologically in place (the fp16 converter appends its Cast nodes at the end)."""
    avail = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    missing = [sum(1 for t in set(n.input) if t not in avail) for n in nodes]
    consumers = {}
    for k, n in enumerate(nodes):
        for t in set(n.input):
            if t not in avail:
                consumers.setdefault(t, []).append(k)
    ready = [k for k, m in enumerate(missing) if m == 0]
    order = []
    while ready:
        k = ready.pop(0)
        order.append(nodes[k])
        for t in nodes[k].output:
            for c in consumers.pop(t, []):
                missing[c] -= 1
                if missing[c] == 0:
                    ready.append(c)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle or a node reading an undefined tensor")
    del graph.node[:]
    graph.node.extend(order)


def _cast_to(node):
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _drop_cast_roundtrips(graph, fp32):
    """Remove float32 -> float16 -> float32 Cast pairs on tensors known to be float32 (`fp32`, a set of names).
    The converter puts such a pair after every blocked node, so a blocked float32 chain would still be rounded
    to fp16 (and overflow) between its nodes; without the pairs the chain really runs in float32."""
    import onnx
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    outputs, inputs = {o.name for o in graph.output}, {i.name for i in graph.input}
    while True:
        producer = {o: n for n in graph.node for o in n.output}
        for c2 in graph.node:
            if c2.op_type != "Cast" or _cast_to(c2) != F32:
                continue
            c1 = producer.get(c2.input[0])
            if c1 is None or c1.op_type != "Cast" or _cast_to(c1) != F16 or c1.input[0] not in fp32:
                continue
            x, z = c1.input[0], c2.output[0]
            if z in outputs:  # keep the graph output's name: the float32 producer of x now writes z
                if x in outputs or x in inputs or x not in producer:
                    continue
                old, new = x, z
            else:
                old, new = z, x
            graph.node.remove(c2)
            for n in graph.node:
                for seq in (n.input, n.output):
                    for i, t in enumerate(seq):
                        if t == old:
                            seq[i] = new
            fp32.add(new)
            if not any(c1.output[0] in n.input for n in graph.node) and c1.output[0] not in outputs:
                graph.node.remove(c1)
            break
        else:
            return


def to_fp16(proto):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    m = copy.deepcopy(proto)
    for i, n in enumerate(m.graph.node):  # node_block_list works by name; give every node one
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocked = set(_tail_after_last_matmul(m))
        m16 = convert_float_to_float16(m, keep_io_types=True, node_block_list=sorted(blocked))
    fp32 = {o for n in m16.graph.node if n.name in blocked or (n.op_type == "Cast" and _cast_to(n) == 1)
            for o in n.output}
    _drop_cast_roundtrips(m16.graph, fp32)
    _toposort(m16.graph)
    onnx.checker.check_model(m16)
    return m16


def to_int8(proto, feeds, method="minmax"):
    """Calibrated static int8 (ONNX Runtime quantize_static): QDQ format, per-channel symmetric int8 weights, int8
    activations whose ranges come from running `feeds` (a list of input dicts, training data) through the graph.
    Quantised: Conv, Gemm, MatMul (the compute) plus Relu/MaxPool/GlobalAveragePool/Add on the image graph, so the
    CNN stays int8 between convolutions; the text graph's Add/Mul/Softmax/LayerNorm stay float (the additive -1e4
    attention mask would otherwise set the range of every Add it flows into). The final L2 normalisation stays float
    in both. -> bytes of the quantised model."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    m = copy.deepcopy(proto)
    for i, n in enumerate(m.graph.node):  # nodes_to_exclude works by name; give every node one
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    is_image = [i.name for i in m.graph.input] == ["image"]
    ops = ["Conv", "Gemm", "MatMul"] + (["Relu", "MaxPool", "GlobalAveragePool", "Add"] if is_image else [])
    with tempfile.TemporaryDirectory() as td:
        src, dst = os.path.join(td, "fp32.onnx"), os.path.join(td, "int8.onnx")
        with open(src, "wb") as f:
            f.write(m.SerializeToString())
        import onnxruntime as ort
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "consider pre-processing" advice, printed on every call
        ort.set_default_logger_severity(3)  # the calibrator's sessions warn about initializers it leaves unused
        try:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                            nodes_to_exclude=_tail_after_last_matmul(m),
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "percentile": CalibrationMethod.Percentile,
                                              "entropy": CalibrationMethod.Entropy}[method],
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        finally:
            root.setLevel(level)
        with open(dst, "rb") as f:
            return f.read()


def batches(arrays, batch, static):
    """Split aligned arrays (dict name -> [N,...]) into feed dicts of `batch` rows; a static graph needs exactly
    `batch` rows, so its last partial chunk is padded by repeating the first rows (outputs are cut back by callers)."""
    n = len(next(iter(arrays.values())))
    out = []
    for s in range(0, n, batch):
        part = {k: v[s:s + batch] for k, v in arrays.items()}
        m = len(next(iter(part.values())))
        if static and m < batch:
            part = {k: np.concatenate([v, np.resize(arrays[k], (batch - m,) + v.shape[1:])]) for k, v in part.items()}
        out.append((part, m))
    return out


def run_graph(sess, arrays, batch, static):
    outs = [sess.run(["embedding"], f)[0][:m] for f, m in batches(arrays, batch, static)]
    return np.concatenate(outs)


def text_arrays(texts, table, text_length, vocab_size):
    """Captions -> model_text.onnx inputs exactly as search/ builds them (charmap, table lookup, padded to L)."""
    from search import charmap
    ids, mask = charmap.encode_batch(texts, max_len=text_length, vocab_size=vocab_size)
    return {"text_embeds": charmap.lookup(table, ids), "text_mask": mask.astype(np.float32)}


def load_split_data(data_json, image_root, test_ratio, size, calib_size, image_size, mean, std):
    """Training-split calibration inputs and held-out parity inputs from a dataset JSON (data.py):
    -> dict(calib_images [n,3,H,W], calib_texts [str], test_images [m,3,H,W], test_pids [m], test_texts [str],
    test_text_pids [k], desc). Images go through search/'s preprocessing (= the training eval transform)."""
    import data as data_lib
    from search.engine import preprocess as search_preprocess

    try:
        records = data_lib.load_records(data_json, image_root)
    except (OSError, ValueError) as e:
        raise ExportFailure(f"--data {data_json}: {_first_line(e)}", 2) from None
    train = data_lib.split_records(records, test_ratio, "train")
    test = data_lib.split_records(records, test_ratio, "test")
    if not train or not test:
        raise ExportFailure(f"--data {data_json}: needs both training and held-out identities "
                            f"({len(train)} train / {len(test)} held-out records)", 2)

    def images(indices, n):
        step = max(1, len(indices) // n)  # spread over the split, deterministic
        xs, pids, kept, skipped = [], [], [], 0
        for r in indices[::step]:
            im = data_lib.load_image(records[r]["image_path"])
            if im is None:
                skipped += 1
                continue
            xs.append(search_preprocess(im, None, image_size, mean, std))
            pids.append(records[r]["id"])
            kept.append(r)
            if len(xs) == n:
                break
        return (np.stack(xs) if xs else np.zeros((0, 3, *image_size), np.float32)), np.array(pids), kept, skipped

    ci, _, _, sk1 = images(train, calib_size)
    ti, tp, kept, sk2 = images(test, size)
    if not len(ci) or not len(ti):
        raise ExportFailure(f"--data {data_json}: no decodable {'training' if not len(ci) else 'held-out'} images "
                            f"({sk1 + sk2} skipped)", 2)
    rows = data_lib.caption_rows(records)
    tr = set(train)
    ctexts = [t for r, _, t, _ in rows if r in tr]
    ctexts = ctexts[:: max(1, len(ctexts) // calib_size)][:calib_size]
    # search queries are short (a few words, or nothing yet): calibrating on full captions alone left a one-token
    # text far outside the calibrated ranges (min cos 0.97 for ""), so every other caption is cut to a prefix
    cuts = (0, 4, 8, 16, 24, 32, 48)
    ctexts = [t if i % 2 else t[: cuts[(i // 2) % len(cuts)]] for i, t in enumerate(ctexts)]
    caps = data_lib.eval_captions(records, kept, langs=("en",))
    desc = (f"{data_json}: calibration {len(ci)} training images + {len(ctexts)} captions (en+zh, half of them cut "
            f"to short prefixes); held out "
            f"{len(ti)} images of {len(set(tp.tolist()))} ids + {len(caps)} English captions"
            + (f"; skipped {sk1 + sk2} undecodable images" if sk1 + sk2 else ""))
    return dict(calib_images=ci, calib_texts=ctexts, test_images=ti, test_pids=tp,
                test_texts=[c[3] for c in caps], test_text_pids=np.array([c[1] for c in caps]), desc=desc)


def latency_ms(model_bytes, feeds, runs=30):
    """Median ms of one ORT run (1 intra-op thread: what a phone core / search/'s TextEncoder uses)."""
    import time
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(["embedding"], feeds)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["embedding"], feeds)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def r1_ok(r1, r1_ref, n_queries, max_drop):
    """Held-out R@1 within max_drop points of fp32, or within one query when one query is worth more."""
    return abs(r1 - r1_ref) <= max(max_drop, 100.0 / max(1, n_queries)) + 1e-9


# ------------------------------------------------------------------------------------------------ main
def _shape_settings(args, max_len):
    """-> (static, batch, text_length) from the flags; ExportFailure(2) for an impossible combination."""
    if not args.static_shapes:
        if args.batch is not None or args.text_length is not None:
            raise ExportFailure("--batch and --text_length fix the static shapes: use them with --static_shapes", 2)
        return False, None, max_len
    b = 1 if args.batch is None else args.batch
    L = max_len if args.text_length is None else args.text_length
    if b < 1:
        raise ExportFailure(f"--batch must be >= 1, got {b}", 2)
    if not 2 <= L <= max_len:
        raise ExportFailure(f"--text_length must be in [2, max_seq_length={max_len}] (CLS + at least one character; "
                            f"the positional table has {max_len} rows), got {L}", 2)
    return True, b, L


def heldout_parity(graph_bytes, variants, split_data, table, text_L, V, batch, static, max_drop):
    """Held-out parity of each variant against the fp32 graphs, through the whole search path.
    graph_bytes: {"image"|"text": fp32 bytes}; variants: {kind: {"image"|"text": bytes, "tables": [table kinds]}}.
    -> {"fp32": {"r1", "n_queries"}, kind: {"cos_image", "cos_text", "r1", "table", "ok", "why"}}."""
    import metrics
    from search import charmap

    def run(b, arrays):
        return run_graph(ort_session(b), arrays, batch or 16, static)

    sd = split_data
    img_arrays = {"image": sd["test_images"]}
    ref_img = run(graph_bytes["image"], img_arrays) if "image" in graph_bytes else None
    ref_txt = run(graph_bytes["text"], text_arrays(sd["test_texts"], table, text_L, V))
    nq = len(sd["test_texts"])

    def r1(img, txt):
        if img is None:
            return None
        return metrics.retrieval(txt, sd["test_text_pids"], img, sd["test_pids"])["R@1"]

    out = {"fp32": {"r1": r1(ref_img, ref_txt), "n_queries": nq}}
    for kind, v in variants.items():
        img = run(v["image"], img_arrays) if v.get("image") else ref_img
        cos_img = _compare(ref_img, img)[1] if v.get("image") else None
        res = None
        for tk in v["tables"]:  # the most compact table first; a fuller one if it misses the bound
            txt = run(v["text"], text_arrays(sd["test_texts"], charmap.stored_table(table, tk), text_L, V)) \
                if v.get("text") else ref_txt
            cos_txt = _compare(ref_txt, txt)[1]
            rr = r1(img, txt)
            why = []
            if cos_img is not None and cos_img < v["min_cos"]:
                why.append(f"image min cos {cos_img:.4f} < {v['min_cos']}")
            if cos_txt < v["min_cos"]:
                why.append(f"text min cos {cos_txt:.4f} < {v['min_cos']}")
            if rr is not None and not r1_ok(rr, out["fp32"]["r1"], nq, max_drop):
                why.append(f"R@1 {rr:.2f} vs fp32 {out['fp32']['r1']:.2f} (allowed +-{max(max_drop, 100 / nq):.2f})")
            res = dict(cos_image=cos_img, cos_text=cos_txt, r1=rr, table=tk, ok=not why, why="; ".join(why))
            if not why:
                break
        out[kind] = res
    return out


def print_variant_table(rows):
    """rows: [kind, image MiB, text+table MiB, image ms, text ms, cos, R@1, status]."""
    heads = ["", "image MiB", "text+table MiB", "image ms b1", "text ms b1", "min cos img/txt (held out)",
             "R@1 (held out)", ""]
    w = [max(len(str(r[i])) for r in [heads] + rows) for i in range(len(heads))]
    for r in [heads] + rows:
        print("  " + "  ".join(str(c).ljust(w[i]) if i in (0, 7) else str(c).rjust(w[i]) for i, c in enumerate(r)))


def export(args):
    import torch
    from backbone import reparameterize_model
    from search import charmap

    if args.batch_check < 2:
        raise ExportFailure("--batch_check must be >= 2 (batch 1 is always checked too)", 2)
    if args.calib_size < 1 or args.parity_size < 1:
        raise ExportFailure("--calib_size and --parity_size must be >= 1", 2)
    model, cfg, train_args = load_model(args.checkpoint)
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportFailure(f"{out_dir}: exists and is not a folder", 2)
    text_only = bool(cfg.get("text_only"))
    max_len = int(cfg["max_seq_length"])
    static, SB, text_L = _shape_settings(args, max_len)
    n = args.batch_check
    H, W = (int(v) for v in cfg["image_size"])
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)

    emb = find_input_embeddings(model)
    table = emb.weight.detach().cpu().float().numpy().copy()
    V, E = table.shape
    if (V, E) != (int(cfg["vocab_size"]), int(cfg["embed_dim"])):
        raise ExportFailure(f"input table is {V}x{E} but model_cfg says vocab_size={cfg['vocab_size']}, "
                            f"embed_dim={cfg['embed_dim']}", 2)

    # ---- calibration / held-out data (before any slow step: a missing dataset is a usage error)
    split_data = None
    data_json = args.data or train_args.get("data")
    if args.int8 or (args.fp16 and data_json):
        if not data_json or not os.path.isfile(str(data_json)):
            if args.int8 or args.data:
                where = (f"--data {args.data} not found" if args.data else
                         f"the checkpoint's training data {data_json} is not there" if data_json else
                         "the checkpoint names no training data")
                raise ExportFailure(f"--int8 calibrates on training images/captions and checks parity on held-out "
                                    f"ids: {where}; pass --data DATASET.json", 2)
        else:
            split_data = load_split_data(data_json, args.image_root or train_args.get("image_root"),
                                         float(train_args.get("test_ratio", 0.1)), args.parity_size,
                                         args.calib_size if args.int8 else 1,  # fp16 needs no calibration
                                         (H, W), mean, std)
            print(f"calibration / parity data: {split_data['desc']}")

    # ---- reference inputs and PyTorch outputs of the checkpoint's model as trained (before folding)
    ref_model = copy.deepcopy(model).eval()
    bank = query_bank(args, ref_model, cfg, train_args, data_json, text_only)
    k = len(CHECK_TEXTS)
    texts = verification_texts(max(n, k, SB or 1))
    ids, mask = charmap.encode_batch(texts, max_len=text_L, vocab_size=V)
    x_text = charmap.lookup(table, ids)                      # what search/ does, in numpy
    if static:
        text_cases_spec = [(f"texts {s}-{s + SB - 1}, static [{SB},{text_L}]", slice(s, s + SB), text_L)
                           for s in range(0, len(texts) - SB + 1, SB)]
    else:
        short_L = max(2, min(max_len - 1, 12))
        text_cases_spec = [(f"texts batch 1, L={max_len}", slice(0, 1), max_len),
                           (f"texts batch {n}, L={max_len}", slice(0, n), max_len),
                           (f"all {k} texts, L={max_len}", slice(0, k), max_len),
                           (f"all {k} texts, L={short_L} (dynamic L)", slice(0, k), short_L)]
    text_cases = []
    for name, rows, L in text_cases_spec:
        ref = ref_model.encode_text(torch.from_numpy(ids[rows, :L]), torch.from_numpy(mask[rows, :L])).numpy()
        feeds = {"text_embeds": np.ascontiguousarray(x_text[rows, :L]),
                 "text_mask": mask[rows, :L].astype(np.float32)}
        text_cases.append((name, feeds, ref))
    image_cases = []
    if not text_only:
        images, img_src = verification_images(train_args, cfg, max(n, SB or 1))
        print(f"verification images: {img_src}")
        spec = ([(f"images static batch {SB}", slice(0, SB))] if static else
                [("images batch 1", slice(0, 1)), (f"images batch {n}", slice(0, n))])
        for name, rows in spec:
            ref = ref_model.encode_image(torch.from_numpy(images[rows])).numpy()
            image_cases.append((name, {"image": images[rows]}, ref))

    # ---- fold train-time branches / BN, and check the folded model in PyTorch first
    n_before = sum(p.numel() for p in model.parameters())
    model = reparameterize_model(model) or model
    model.eval()
    n_after = sum(p.numel() for p in model.parameters())
    worst = (0.0, 1.0)
    for name, feeds, ref in text_cases + image_cases:
        if "image" in feeds:
            got = model.encode_image(torch.from_numpy(feeds["image"])).numpy()
        else:
            got = model.encode_text_embedded(torch.from_numpy(feeds["text_embeds"]),
                                             torch.from_numpy(feeds["text_mask"])).numpy()
        mx, mc = _compare(ref, got)
        worst = (max(worst[0], mx), min(worst[1], mc))
    print(f"reparameterize: {n_before / 1e6:.3f}M -> {n_after / 1e6:.3f}M params; folded vs checkpoint model "
          f"(PyTorch): max|diff| = {worst[0]:.2e}, min cos = {worst[1]:.6f}")
    if worst[1] < args.min_cos or worst[0] > args.atol:
        raise ExportFailure(f"folding changed the model: max|diff| {worst[0]:.2e}, min cos {worst[1]:.6f}")

    image_graph, text_graph = make_wrappers(model)
    graphs = []
    b_in = SB if static else 2
    if not text_only:
        graphs.append(dict(
            name="image", file=IMAGE_FILE, module=image_graph,
            inputs=(torch.from_numpy(images[:b_in]),), input_names=["image"],
            dyn={} if static else {"image": {0: ("batch", None)}},
            spec={"image": [SB if static else "batch", 3, H, W]}, cases=image_cases,
            calib={"image": split_data["calib_images"]} if split_data else None))
    graphs.append(dict(
        name="text", file=TEXT_FILE, module=text_graph,
        inputs=(torch.from_numpy(x_text[:b_in]), torch.from_numpy(mask[:b_in].astype(np.float32))),
        input_names=["text_embeds", "text_mask"],
        dyn={} if static else {"text_embeds": {0: ("batch", None), 1: ("seq", max_len)},
                               "text_mask": {0: ("batch", None), 1: ("seq", max_len)}},
        spec={"text_embeds": [SB, text_L, E], "text_mask": [SB, text_L]} if static else
             {"text_embeds": ["batch", "seq", E], "text_mask": ["batch", "seq"]}, cases=text_cases,
        calib=text_arrays(split_data["calib_texts"], table, text_L, V) if split_data else None))

    # ---- export, simplify, check, verify: everything in memory; nothing is written unless it all passes
    to_write, failures, refused = [], [], []  # to_write: (path, bytes, after-write printer)
    kinds = [(kd, lim) for kd, on, lim in (("fp16", args.fp16, args.fp16_min_cos), ("int8", args.int8,
                                                                                    args.int8_min_cos)) if on]
    fp32_bytes, variants, reports, sizes = {}, {kd: {"min_cos": lim} for kd, lim in kinds}, {}, {}
    for g in graphs:
        print(f"[{g['name']}] exporting{' with static shapes' if static else ''} ...")
        raw, how = export_graph(g["module"], g["inputs"], g["input_names"], g["dyn"], args.opset, args.exporter)
        simp, tool = simplify(raw, "none" if args.no_simplify else args.simplifier)
        if static:
            simp = static_cleanup(simp)
            tool += "; static-shape cleanup (Constant -> initializer, Unsqueeze -> Reshape)"
        print(f"[{g['name']}] {how}; {tool}")
        check_contract(simp, g["spec"], g["file"])
        if g["name"] == "text":
            bad = gathers_on_inputs(simp)
            if bad:
                raise ExportFailure(f"{TEXT_FILE}: Gather on a graph input ({', '.join(bad)}): the embedding lookup "
                                    f"must stay outside the graph")
        reports[g["file"]] = op_report(simp)
        print(format_op_report(g["file"], reports[g["file"]]))
        raw_bytes, simp_bytes = raw.SerializeToString(), simp.SerializeToString()
        print("test onnx model ... ...")
        _, _, err = verify(simp_bytes, g["cases"], args.min_cos, args.atol, g["file"], show_stats=True)
        if err:
            raise ExportFailure(err)
        fp32_bytes[g["name"]] = simp_bytes
        path = out_dir / g["file"]
        to_write.append((path, simp_bytes, (lambda r=raw, s=simp, rb=len(raw_bytes), sb=len(simp_bytes), p=path:
                                            (print(f'export to "{p}" OK.'), print_op_table(p.name, r, s, rb, sb)))))
        for kind, lim in kinds:
            vfile = g["file"].replace(".onnx", f".{kind}.onnx")
            try:
                if kind == "fp16":
                    vbytes = to_fp16(simp).SerializeToString()
                else:
                    print(f"[{g['name']}] int8: calibrating on {len(next(iter(g['calib'].values())))} training "
                          f"{'images' if g['name'] == 'image' else 'captions'} ({args.calibrate_method}) ...")
                    # equal-sized batches (the last one padded with repeats): the histogram calibrators
                    # (percentile, entropy) stack them and fail on a ragged last batch
                    vbytes = to_int8(simp, [f for f, _ in batches(g["calib"], SB or 16, True)],
                                     args.calibrate_method)
                mx, mc, err = verify(vbytes, g["cases"], lim, None, vfile)
            except Exception as e:
                mx, mc, err = None, None, f"{vfile}: conversion failed: {_first_line(e)}"
            if err:
                print(f"  warning: {err}; {vfile} not written")
                failures.append(err)
                refused.append(out_dir / vfile)
                continue
            variants[kind][g["name"]] = vbytes
            variants[kind][g["name"] + "_msg"] = (f"{kind}: {_mib(len(vbytes))} (fp32 {_mib(len(simp_bytes))}), vs "
                                                  f"PyTorch fp32: max|diff| = {mx:.2e}, min cos = {mc:.6f} "
                                                  f"(needs >= {lim})")
            import onnx
            reports[vfile] = op_report(onnx.load_from_string(vbytes))
            print(format_op_report(vfile, reports[vfile]))

    # ---- variants: held-out parity through the whole search path, the size / latency / parity table, decisions
    for kind in variants:
        variants[kind]["tables"] = ["int8", "fp16"] if kind == "int8" else ["fp16"]
    parity = heldout_parity(fp32_bytes, variants, split_data, table, text_L, V, SB, static, args.max_r1_drop) \
        if split_data and variants else None
    table_files = {}  # kind -> table kind written with it
    for kind, v in variants.items():
        if not any(v.get(gn) for gn in ("image", "text")):
            continue
        p = parity.get(kind) if parity else None
        if p is not None and not p["ok"]:
            err = f"{kind} variant misses the held-out parity bound ({p['why']})"
            print(f"  warning: {err}; not written")
            failures.append(err)
            refused.extend(out_dir / g["file"].replace(".onnx", f".{kind}.onnx") for g in graphs)
            v["refused"] = True
            continue
        for g in graphs:
            if v.get(g["name"]):
                vpath = out_dir / g["file"].replace(".onnx", f".{kind}.onnx")
                to_write.append((vpath, v[g["name"]],
                                 (lambda p_=vpath, m=v[g["name"] + "_msg"]: print(f'export to "{p_}" OK.  {m}'))))
        if v.get("text"):
            table_files[kind] = p["table"] if p else v["tables"][-1]
    b1 = SB if static else 1
    lat_feeds = {"image": {"image": image_cases[0][1]["image"][:b1]} if image_cases else None,
                 "text": {k_: a[:b1] for k_, a in text_cases[0][1].items()}}
    rows = []
    for kind in ["fp32"] + list(variants):
        gb = fp32_bytes if kind == "fp32" else {gn: variants[kind].get(gn) for gn in ("image", "text")}
        tk = "fp32" if kind == "fp32" else table_files.get(kind, variants[kind]["tables"][0])
        tbytes = len(charmap.table_bytes(table, tk))
        p = (parity or {}).get(kind)
        img_mb = f"{len(gb['image']) / 2**20:.2f}" if gb.get("image") else "-"
        txt_mb = f"{(len(gb['text']) + tbytes) / 2**20:.2f} ({tk} table)" if gb.get("text") else "-"
        ms = [f"{latency_ms(gb[gn], lat_feeds[gn]):.2f}" if gb.get(gn) and lat_feeds[gn] else "-"
              for gn in ("image", "text")]
        cos = ("-" if kind == "fp32" else "n/a (no --data)" if p is None else
               "/".join("-" if c is None else f"{c:.4f}" for c in (p["cos_image"], p["cos_text"])))
        r1 = ((parity or {}).get("fp32", {}).get("r1") if kind == "fp32" else (p or {}).get("r1"))
        status = ("" if kind == "fp32" else "refused" if variants[kind].get("refused") or not any(
            variants[kind].get(gn) for gn in ("image", "text")) else "written")
        rows.append([kind, img_mb, txt_mb, ms[0], ms[1], cos, "n/a" if r1 is None else f"{r1:.2f}", status])
    if variants:
        nq = parity["fp32"]["n_queries"] if parity else 0
        print(f"variants (ORT, 1 thread, batch {b1}, L={text_L}; held-out "
              f"parity vs the fp32 graphs on {nq} captions{'' if parity else ' (not measured: no --data)'}):")
        print_variant_table(rows)

    shapes = {g2["file"]: {k2: v2 for k2, v2 in g2["spec"].items()} for g2 in graphs}
    try:
        qvocab = QueryVocab(cfg["query_vocab"]) if cfg.get("query_vocab") else None
    except QueryVocabError as e:
        raise ExportFailure(f"model_cfg: {e}", 2) from None
    info = {
        "format_version": FORMAT_VERSION,
        "image_size": [H, W],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "max_seq_length": max_len,
        "vocab_size": int(V),
        "embed_dim": int(E),
        "charmap_version": cfg.get("charmap_version", charmap.CHARMAP_VERSION),
        "feature_dim": int(cfg["feature_dim"]),
        "teacher_space": bool(cfg.get("teacher_space", text_only)),
        "teacher": str(cfg.get("teacher_name") or ""),
        "backbone": None if text_only else cfg.get("backbone"),
        "text_backbone": cfg.get("text_backbone"),
        "image_model": None if text_only else IMAGE_FILE,
        "text_model": TEXT_FILE,
        "input_embeddings": TABLE_FILE,
        # the student's word list: search/ drops the query words the student never saw (search/query_words.py)
        "query_vocab": QUERY_VOCAB_FILE if qvocab is not None else None,
        # search/hubness.py: enrolment stores each image's mean cosine to its k nearest bank texts; search ranks
        # by cosine - weight * that
        "query_bank": None if bank is None else {"file": hubness.QUERY_BANK_FILE, "rows": int(len(bank)),
                                                 "k": hubness.default_k(len(bank)), "weight": hubness.DEFAULT_WEIGHT},
        "static_shapes": {"batch": SB, "text_length": text_L} if static else None,
        "input_shapes": shapes,
        "variants": {kind: {"image_model": None if text_only else IMAGE_FILE.replace(".onnx", f".{kind}.onnx"),
                            "text_model": TEXT_FILE.replace(".onnx", f".{kind}.onnx"),
                            "input_embeddings": charmap.TABLE_FILES[tk],
                            "parity": None if not parity else {
                                k2: parity[kind][k2] for k2 in ("cos_image", "cos_text", "r1")} | {
                                "r1_fp32": parity["fp32"]["r1"], "n_queries": parity["fp32"]["n_queries"]}}
                     for kind, tk in table_files.items()},
        "ops": {f: r["ops"] for f, r in reports.items()},
        "outside_npu_list": {f: r["outside_npu_list"] for f, r in reports.items()},
    }
    info["ops"] = {f: r for f, r in info["ops"].items()
                   if f in {p.name for p, _, _ in to_write}}
    info["outside_npu_list"] = {f: r for f, r in info["outside_npu_list"].items() if f in info["ops"]}

    # ---- write: old model_info.json first out, new one last, so a crash mid-way never pairs old info with new graphs
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(out_dir / INFO_FILE)
    for path, data, after in to_write:
        _atomic_write(path, data)
        after()
    for tk in ["fp32"] + sorted(set(table_files.values())):
        tpath = out_dir / charmap.TABLE_FILES[tk]
        _atomic_write(tpath, charmap.table_bytes(table, tk))
        if not np.array_equal(charmap.load_table(tpath), charmap.stored_table(table, tk)):
            raise ExportFailure(f"{tpath}: read-back differs from the model's table")
        print(f'export to "{tpath}" OK.  [{V}, {E}] {tk}, {_mib(tpath.stat().st_size)}')
    if qvocab is not None:
        _atomic_write(out_dir / QUERY_VOCAB_FILE, qvocab.to_text().encode("utf-8"))
        print(f'export to "{out_dir / QUERY_VOCAB_FILE}" OK.  {len(qvocab)} words')
    else:  # a checkpoint from before the word list: no filter, and no earlier export's list to pass for its own
        with contextlib.suppress(FileNotFoundError):
            os.remove(out_dir / QUERY_VOCAB_FILE)
    if bank is not None:
        _atomic_write(out_dir / hubness.QUERY_BANK_FILE, _npy_bytes(bank.astype(np.float16)))
        print(f'export to "{out_dir / hubness.QUERY_BANK_FILE}" OK.  [{len(bank)}, {bank.shape[1]}] float16')
    else:  # an earlier export's bank would pass for this model's
        with contextlib.suppress(FileNotFoundError):
            os.remove(out_dir / hubness.QUERY_BANK_FILE)
    _atomic_write(out_dir / INFO_FILE, (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f'export to "{out_dir / INFO_FILE}" OK.')
    for p in refused:  # a same-named file from an earlier export would now pass for this model's variant
        if p.exists():
            os.remove(p)
            print(f"removed {p}: an earlier export's file, and this export's {p.name} missed its bound")
    written = {p.name for p, _, _ in to_write}
    stale = sorted(p.name for p in out_dir.glob("model_*.onnx") if p.name not in written)
    if stale:
        print(f"note: {', '.join(stale)} in {out_dir} are from an earlier export, not this checkpoint")
    if failures:
        raise ExportFailure(f"the fp32 export in {out_dir} is complete, but {len(failures)} variant(s) missed their "
                            f"bound and were not written: " + " | ".join(failures))


def main(args):
    import torch
    from torch.onnx import _constants as onnx_c  # the opsets this torch's exporters can write
    lo, hi = (18, onnx_c.ONNX_MAX_OPSET) if args.exporter == "dynamo" else \
        (13, getattr(onnx_c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    if not lo <= args.opset <= hi:
        print(f"error: --opset must be {lo}..{hi} for --exporter {args.exporter}, got {args.opset}", file=sys.stderr)
        raise SystemExit(2)
    try:
        with torch.no_grad():
            export(args)
    except ExportFailure as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.code)
    except OSError as e:  # unwritable output folder, full disk, ...
        print(f"error: {e.filename or args.output_dir}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
