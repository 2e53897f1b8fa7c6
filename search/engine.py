r"""Torch-free inference core of `search/`: the exported ONNX models, their preprocessing, and the text path.

Reads what `export_model.py` writes (docs/INTERFACES.md, "Export"):
    model_info.json, model_image.onnx (input `image` [B,3,H,W]), model_text.onnx (inputs `text_embeds` [B,L,E],
    `text_mask` [B,L]; output `embedding`), input_embeddings.pt.npy [V,E] (or the fp16 / int8 table of a variant:
    search/charmap.py defines the table formats). Static-shape exports (export_model.py --static_shapes): queries
    are padded or truncated to the graph's fixed text length and run at its fixed batch.

    from search.engine import load_export, ImageEncoder, TextEncoder
    info = load_export("logs/expModel-.../export")          # dict + resolved file paths
    img = ImageEncoder(info)                                   # .encode([(pil_image, bbox_or_None), ...]) -> [B,D]
    txt = TextEncoder(info)                                    # .encode(["a man in a red coat"]) -> [B,D]
    txt = TextEncoder(text_model="export/model_text.onnx")    # model_info.json + table found beside it

Only numpy, Pillow, onnxruntime and search.charmap are imported (the search side runs without torch).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from search.charmap import CHARMAP_VERSION, encode_batch, load_table, lookup, normalize_text
from search.query_words import QueryVocabError, load_query_vocab, prepare_query
from search.imaging import to_rgb
from search import hubness

MODEL_INFO = "model_info.json"


class ExportError(ValueError):
    """A missing / malformed exported model. The message is one line meant for the user."""


# ------------------------------------------------------------------------------------------- export loading
def resolve_model_dir(model_dir=None, text_model=None, image_model=None):
    """Where the export lives. Order: --model_dir; the folder of --text-model / --image-model; the current
    directory when it holds model_info.json (the seed's `cd search; python api.py` with the models copied in)."""
    if model_dir:
        return Path(model_dir)
    for p in (text_model, image_model):
        if p:
            return Path(p).resolve().parent
    if Path(MODEL_INFO).is_file():
        return Path(".")
    raise ExportError("no exported model given: pass --model_dir EXPORT_DIR (the folder export_model.py wrote, "
                      "holding model_info.json) or --text-model EXPORT_DIR/model_text.onnx")


def load_export(model_dir):
    """Read `model_info.json` of an export folder. Returns the info dict plus resolved absolute paths:
    `_dir`, `_image_model` (None for a --text_only export), `_text_model`, `_input_embeddings`."""
    d = Path(model_dir)
    if d.is_file() and d.suffix == ".onnx":  # tolerate a model file passed as the folder
        d = d.resolve().parent
    f = d / MODEL_INFO
    if not f.is_file():
        raise ExportError(f"{f}: not found (is {d} a folder written by export_model.py?)")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ExportError(f"{f}: unreadable model info ({e.__class__.__name__}: {e})") from None
    if not isinstance(info, dict):
        raise ExportError(f"{f}: expected a JSON object")
    for k in ("feature_dim", "max_seq_length"):
        if not isinstance(info.get(k), int) or info[k] < 1:
            raise ExportError(f"{f}: missing or invalid '{k}'")
    cv = info.get("charmap_version", CHARMAP_VERSION)
    if cv != CHARMAP_VERSION:
        raise ExportError(f"{f}: model uses character mapping '{cv}', this search/charmap.py implements "
                          f"'{CHARMAP_VERSION}' — use the search/ code of the release that exported the model")
    info = dict(info)
    info["_dir"] = str(d.resolve())
    img = info.get("image_model", "model_image.onnx")
    info["_image_model"] = str(d.resolve() / img) if img else None
    info["_text_model"] = str(d.resolve() / info.get("text_model", "model_text.onnx"))
    info["_input_embeddings"] = str(d.resolve() / info.get("input_embeddings", "input_embeddings.pt.npy"))
    return info


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def teacher_key(name):
    """Comparable teacher identity: an HF id and a local copy of it ('/models/siglip2-base-...') agree."""
    return os.path.basename(str(name).rstrip("/\\")).lower() if name else ""


def export_space(info):
    """The embedding space an export's encoders live in: 'teacher:<name>' for a --text_only (teacher-space)
    model, else 'student:<sha256 of model_image.onnx, 16 hex>' (student spaces are private to one training)."""
    if info.get("teacher_space"):
        return f"teacher:{teacher_key(info.get('teacher'))}"
    p = info.get("_image_model")
    if p and os.path.isfile(p):
        return "student:" + file_sha256(p)[:16]
    return "student:unknown"


def load_hub(info):
    """The export's hubness correction (search/hubness.py) or None when it has none:
    {"bank": float32 [N,D], "k": int, "weight": float, "sha256": str}. The bank file is looked up beside
    model_info.json only (its name, never a path, is taken from the info)."""
    q = info.get("query_bank")
    if not q:
        return None
    where = Path(info["_dir"]) / MODEL_INFO
    if not isinstance(q, dict) or not isinstance(q.get("file"), str):
        raise ExportError(f"{where}: 'query_bank' must be an object with a 'file' name")
    path = Path(info["_dir"]) / Path(q["file"]).name
    if not path.is_file():
        raise ExportError(f"{path}: not found (model_info.json names it as the query bank; re-export the model)")
    try:
        bank = hubness.load_query_bank(path, info["feature_dim"])
    except ValueError as e:
        raise ExportError(str(e)) from None
    k, w = q.get("k", hubness.default_k(len(bank))), q.get("weight", hubness.DEFAULT_WEIGHT)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or not isinstance(w, (int, float)) or \
            isinstance(w, bool) or not 0 <= w < 10:
        raise ExportError(f"{where}: 'query_bank' needs an integer k >= 1 and a weight in [0, 10), got k={k!r}, "
                          f"weight={w!r}")
    return {"bank": bank, "k": min(k, len(bank)), "weight": float(w), "sha256": file_sha256(path)}


# ------------------------------------------------------------------------------------------- onnxruntime
def default_threads():
    """intra-op threads: all cores up to 8 (tiny models gain nothing beyond; leave room for the server)."""
    return max(1, min(8, os.cpu_count() or 1))


def make_session(path, threads=None, providers=None):
    import onnxruntime as ort  # imported here so `import search.engine` stays cheap

    if not os.path.isfile(path):
        raise ExportError(f"{path}: ONNX model not found")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1  # the graphs are sequential; extra inter-op pools only cost wake-ups
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: no per-session warnings on the user's terminal
    # idle pool threads sleep instead of spinning: on a shared CPU spinning steals the cores the index search and
    # the other requests need
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for corrupt / unsupported graphs
        raise ExportError(f"{path}: cannot load ONNX model ({str(e).splitlines()[0][:200]})") from None


def _fixed_batch(sess):
    """The batch size a graph was exported with when it is static (e.g. 1 on some NPU exports), else None."""
    b = sess.get_inputs()[0].shape[0]
    return b if isinstance(b, int) and b > 0 else None


def _run_chunked(sess, feeds, out_name="embedding"):
    fb = _fixed_batch(sess)
    n = next(iter(feeds.values())).shape[0]
    if fb is None or fb == n:
        return sess.run([out_name], feeds)[0]
    outs = []
    for s in range(0, n, fb):  # static batch: feed fb rows at a time, zero-padding the last chunk
        part = {k: v[s:s + fb] for k, v in feeds.items()}
        m = next(iter(part.values())).shape[0]
        if m < fb:
            part = {k: np.concatenate([v, np.zeros((fb - m,) + v.shape[1:], v.dtype)]) for k, v in part.items()}
        outs.append(sess.run([out_name], part)[0][:m])
    return np.concatenate(outs)


def l2_normalize(x, eps=1e-12):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------------------- image side
def clip_bbox(bbox, width, height):
    """Clip [x1,y1,x2,y2] to the image and round to ints; None when the clipped box has no area."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not all(np.isfinite([x1, y1, x2, y2])):
        return None
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    x1, y1 = int(round(max(0.0, min(x1, width)))), int(round(max(0.0, min(y1, height))))
    x2, y2 = int(round(max(0.0, min(x2, width)))), int(round(max(0.0, min(y2, height))))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [x1, y1, x2, y2]


def preprocess(img, bbox, image_size, mean, std):
    """PIL image (+ optional bbox) -> float32 [3,H,W]. Exactly the training eval transform (data.py):
    .convert("RGB") (16-bit scaled, search.imaging.to_rgb), crop, .resize((W,H), BILINEAR), /255, (x-mean)/std, CHW."""
    img = to_rgb(img)
    if bbox is not None:
        img = img.crop(tuple(int(v) for v in bbox))
    h, w = image_size
    x = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class ImageEncoder:
    """model_image.onnx + its preprocessing. `encode(list of (PIL image, bbox|None)) -> float32 [B,D] unit norm`."""

    def __init__(self, info, threads=None):
        if isinstance(info, (str, Path)):
            info = load_export(info)
        if not info.get("_image_model"):
            raise ExportError(f"{info['_dir']}: this export has no image model (a --text_only model); enrol "
                              "with search/enroll_by_siglip.py --teacher <its teacher> instead")
        self.info = info
        self.image_size = tuple(info.get("image_size", (224, 112)))
        self.mean = info.get("mean", (0.485, 0.456, 0.406))
        self.std = info.get("std", (0.229, 0.224, 0.225))
        self.dim = info["feature_dim"]
        self.sess = make_session(info["_image_model"], threads)
        self.input_name = self.sess.get_inputs()[0].name

    def preprocess(self, img, bbox=None):
        return preprocess(img, bbox, self.image_size, self.mean, self.std)

    def encode_arrays(self, x):
        """x float32 [B,3,H,W] already preprocessed -> [B,D]."""
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = _run_chunked(self.sess, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)},
                           self.sess.get_outputs()[0].name)
        return l2_normalize(out)  # the graph normalises already; this only guards drift in float16 exports

    def encode(self, images):
        return self.encode_arrays(np.stack([self.preprocess(im, bb) for im, bb in images]) if images else [])


# ------------------------------------------------------------------------------------------- text side
class TextEncoder:
    """model_text.onnx + the character table. `encode(texts) -> float32 [B,D]`.
    `TextEncoder(model_dir)` or `TextEncoder(text_model=path/model_text.onnx)` (info and table beside it)."""

    kind = "onnx"

    def __init__(self, model_dir=None, text_model=None, threads=None, filter_queries=True):
        info = model_dir if isinstance(model_dir, dict) else load_export(resolve_model_dir(model_dir, text_model))
        if text_model:  # an explicit file wins over model_info's name (e.g. a renamed / quantised copy)
            info = dict(info, _text_model=str(Path(text_model).resolve()))
            # a variant's graph (model_text.int8.onnx) goes with the table its parity was measured with
            for v in (info.get("variants") or {}).values():
                if isinstance(v, dict) and v.get("text_model") == Path(text_model).name and v.get("input_embeddings"):
                    info["_input_embeddings"] = str(Path(info["_dir"]) / Path(str(v["input_embeddings"])).name)
        self.info = info
        self.dim = info["feature_dim"]
        self.max_seq_length = info["max_seq_length"]
        self.vocab_size = info.get("vocab_size", 8192)
        p = info["_input_embeddings"]
        try:
            self.table = load_table(p)  # float32 [V,E] from any of charmap's table formats
        except (OSError, ValueError) as e:
            raise ExportError(f"{p}: cannot read the input-embedding table ({e})") from None
        if self.table.shape[0] < self.vocab_size:
            raise ExportError(f"{p}: table shape {self.table.shape} does not fit vocab_size {self.vocab_size}")
        # the student's word list (query_words.py): a query drops the words the student never saw
        self.query_vocab = None
        self.filter_queries = bool(filter_queries)
        if filter_queries and info.get("query_vocab"):
            qp = Path(info["_dir"]) / Path(str(info["query_vocab"])).name  # beside model_info.json, nowhere else
            try:
                self.query_vocab = load_query_vocab(qp)
            except QueryVocabError as e:
                raise ExportError(str(e)) from None
        # one thread by default: a single query through a small Transformer has too little work to split, and a
        # server gets its parallelism from concurrent requests instead
        self.sess = make_session(info["_text_model"], threads or 1)
        names = [i.name for i in self.sess.get_inputs()]
        if set(names) != {"text_embeds", "text_mask"}:
            raise ExportError(f"{info['_text_model']}: expected inputs text_embeds, text_mask; got {names}")
        self.out_name = "embedding" if "embedding" in [o.name for o in self.sess.get_outputs()] \
            else self.sess.get_outputs()[0].name
        self.name = info["_text_model"]
        self.space = export_space(info)
        hub = load_hub(info)  # search re-ranks by the hub scores enrolment stored with this bank (api.Searcher)
        self.hub = None if hub is None else {"weight": hub["weight"], "sha256": hub["sha256"]}
        shp = {i.name: i.shape for i in self.sess.get_inputs()}["text_mask"]
        self.dynamic_length = len(shp) == 2 and not isinstance(shp[1], int)
        if len(shp) == 2 and isinstance(shp[1], int) and shp[1] > 0:
            # static text length (--static_shapes): every query is padded / truncated to exactly L tokens
            # (the graph's shape is the truth: export_model.py keeps it <= max_seq_length)
            self.max_seq_length = shp[1]

    def prepare(self, text):
        """The text the model reads (query_words.prepare_query, when filtering is on): field labels stripped, and
        the words the student never saw dropped (if the export has a word list)."""
        return prepare_query(text, self.query_vocab) if self.filter_queries else text

    def truncation(self, text):
        """Number of characters kept and the original count, after filtering and normalisation (CLS takes one
        slot)."""
        n = len(normalize_text(self.prepare(text)))
        return min(n, self.max_seq_length - 1), n

    def encode(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        ids, mask = encode_batch([self.prepare(t) for t in texts], self.max_seq_length, self.vocab_size)
        if self.dynamic_length:
            # Run only as many positions as the longest text needs: padding is masked out, so the result is the
            # same (export_model.py verifies shorter L), and a 20-character query costs ~1/3 of a 64-token run.
            n = int(mask.sum(1).max())
            ids, mask = ids[:, :n], mask[:, :n]
        feeds = {"text_embeds": lookup(self.table, ids), "text_mask": mask.astype(np.float32)}
        return l2_normalize(_run_chunked(self.sess, feeds, self.out_name))


class TeacherTextEncoder:
    """An HF teacher's text tower (via teachers.load_teacher) with TextEncoder's interface (imports torch)."""

    kind = "teacher"

    def __init__(self, name_or_path, device="auto", dtype=None, trust_remote_code=False):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from teachers import load_teacher

        self.teacher = load_teacher(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.dim = int(self.teacher.dim)
        self.max_seq_length = None  # the teacher's tokenizer truncates on its own (SigLIP: 64 tokens)
        self.name = getattr(self.teacher, "name", str(name_or_path))
        self.space = f"teacher:{teacher_key(self.name)}"

    def truncation(self, text):
        n = len(normalize_text(text))
        return n, n

    def encode(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return l2_normalize(self.teacher.embed_texts(list(texts)))
