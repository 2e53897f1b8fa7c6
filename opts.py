"""Command-line options of the trainer (main.py), shared as a parent parser (MAE style).

The loss flags live next to the code that reads them (losses.add_loss_args); everything else is here.
"""
import argparse
import os


def parse_image_size(s):
    """'224x112' -> (224, 112) as (H, W); a single number means a square."""
    try:
        parts = [int(p) for p in str(s).lower().replace("*", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must look like 224x112 (HxW), got {s!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"--image_size must look like 224x112 (HxW, each >= 16), got {s!r}")
    return tuple(parts)


def get_args_parser(add_help=False):
    from losses import add_loss_args  # local import: opts is imported by tools that don't need torch yet

    p = argparse.ArgumentParser("Distil an image-text teacher into a tiny person-search student",
                                add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="SYNTH-PEDES/synthpedes-dataset.json", help="dataset JSON (SYNTH-PEDES, CUHK-PEDES reid_raw.json or RSTPReid)")
    g.add_argument("--image_root", default=None, help="folder the JSON's image paths are relative to (default: the JSON's folder)")
    g.add_argument("--record_store", default=None, help="record store folder (record_store.py; default <json stem>.records beside the JSON, built on first use)")
    g.add_argument("--embedding_path", default="embeddings", help="teacher cache written by tools/extract_label.py")
    g.add_argument("--test_ratio", type=float, default=0.1, help="identities held out for test when the JSON has no split")
    g.add_argument("--val_ratio", type=float, default=0.05,
                   help="training identities held out as a validation split (when the JSON has no split): the "
                        "periodic evaluation, the learning curve and best.pt use them, never the test identities")
    g.add_argument("--langs", default="en,zh", help="caption languages used for training (those present in the JSON)")
    g.add_argument("--compose_prob", type=float, default=0.2,
                   help="probability of replacing a training caption by one composed from the record's attributes "
                        "in random order and wording (fixes recall for queries worded unlike the dataset captions)")
    g.add_argument("--instances_per_id", type=int, default=4,
                   help="P x K batches: runs of up to K images of one identity (1 = uniform sampling); 4 against "
                        "1 took held-out R@1 from 9.9 to 15.5 after 400 steps (synthetic 1000 ids, res_tiny)")
    g.add_argument("--compose_zh_prob", type=float, default=0.5,
                   help="share of composed and augmented captions written in Chinese")
    g.add_argument("--augment_prob", type=float, default=0.25,
                   help="probability of replacing a training caption by a query-like text of the record's "
                        "attributes (captions.augment_caption: keyword lists, fragments, 'top: red shirt' forms, "
                        "any field order, synonyms, case), so queries typed unlike the dataset captions still match")
    g.add_argument("--filler_words", type=int, default=0,
                   help="the query-like texts may wrap the attributes in real English words (labels, leads, "
                        "fillers) drawn from this many frequent words, minus every word of the training captions, "
                        "so that words the captions never use are ignored; 0 = invented words only (e.g. 8000; not "
                        "in the recipe: no gain measured on validation, README 1. Data)")
    g.add_argument("--noise_word_prob", type=float, default=0.0,
                   help="probability of inserting 1-6 meaningless words (--filler_words real words or invented "
                        "ones, bare or as labels: 'kettle - red shirt') into an English training text at random "
                        "word boundaries, its teacher target unchanged, so words no caption uses stop moving the "
                        "embedding (captions.insert_noise_words); 0 = off")
    g.add_argument("--consist_weight", type=float, default=0.0,
                   help="weight of the term that pulls each query-like text's embedding to that of its bare keyword "
                        "list (captions.plain_caption, no gradient through the latter): labels, leads and filler "
                        "words must not move the embedding (main.plain_consistency); 0 = off (e.g. 1; not in the "
                        "recipe: no gain measured on validation, README 1. Data)")
    g.add_argument("--text_teacher", default="",
                   help="the cache's teacher (e.g. attributes, or the SigLIP2 folder/hub id given to "
                        "tools/extract_label.py), loaded here to embed each step's query-like texts (--augment_prob), "
                        "which have no cache row: they are then distilled like the dataset captions (fd, rkd, "
                        "dist_rel) instead of only pulled to their image. Checked against the cache's caption rows "
                        "at start. '' = off. Costs one teacher text forward per step (~8 short texts at batch 64)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers per process (default: 4, or the CPU count when lower)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="res_tiny",
                   help="image encoder: a name from backbone.list_backbones() or backbone.<module>.<Class> (res_tiny: "
                        "learns fastest from scratch of the small ones, see README 'Student models')")
    g.add_argument("--stripes", default="auto",
                   help="image pooling: average over N horizontal stripes of the last feature map (head, torso, "
                        "legs, feet keep their place; 'auto' = one per map row, at most 8) or 0 for the global pool")
    g.add_argument("--backbone_weights", default=None, help="local ImageNet state_dict for the tv_* backbones")
    g.add_argument("--text_backbone", default="char_small", help="text encoder size: char_tiny, char_small, char_base")
    g.add_argument("--text_pool", default="mean", choices=["mean", "attn"],
                   help="text tower pooling: mean of every character's output, or attn (a learnt per-character "
                        "weight, softmax over the text; starts as the mean)")
    g.add_argument("--feature_dim", type=int, default=512, help="student embedding size (forced to the teacher's with --text_only)")
    g.add_argument("--max_seq_length", type=int, default=192,
                   help="characters per caption, including the leading CLS (longer ones are cut: 128 cut 6%% of "
                        "the synthetic English captions, median 88 characters, and most field-by-field queries; "
                        "training encodes texts of up to 96 characters apart from the longer ones, so the cap costs little "
                        "on short ones)")
    g.add_argument("--vocab_size", type=int, default=8192, help="rows of the character table (search/charmap.py)")
    g.add_argument("--embed_dim", type=int, default=256, help="width of the character table")
    g.add_argument("--image_size", type=parse_image_size, default=(224, 112), help="HxW")
    g.add_argument("--text_only", action="store_true",
                   help="train only the text encoder, into the teacher's space, to search teacher-enrolled galleries")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm under torchrun")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=128, help="per process")
    g.add_argument("--lr", type=float, default=2e-3,
                   help="peak AdamW lr (2e-3 and 3e-3 trained alike in CPU runs at batch 64; 5e-4 stayed near chance for 300 steps)")
    g.add_argument("--min_lr_ratio", type=float, default=0.05, help="cosine schedule floor, as a fraction of --lr")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, the character table)")
    g.add_argument("--grad_clip", type=float, default=5.0, help="0 disables")
    g.add_argument("--iters", type=int, default=20000, help="optimizer steps in all (a resumed run continues to this)")
    g.add_argument("--warmup", type=int, default=-1,
                   help="linear warm-up steps; -1 = min(500, iters // 10)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA; on a CPU with native bf16 (AMX/AVX512-BF16) bf16 for "
                        "the text tower only (bf16 convolutions were slower than float32 there), else none")
    g.add_argument("--channels_last", choices=["auto", "0", "1"], default="auto",
                   help="channels-last memory format for the image tower (auto = on: faster convolutions)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive non-finite losses (each one is skipped and counted)")
    g.add_argument("--seed", type=int, default=0, help="seeds init, sampling order and augmentation (resume reproduces them)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    g.add_argument("--dist_backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="torchrun process group: auto = nccl on CUDA, gloo on CPU (gloo also runs several processes "
                        "on one GPU, which NCCL refuses)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output_dir", default="logs", help="runs go to <output_dir>/expModel-<backbone>-<H>x<W>-<dim>/<run>/")
    g.add_argument("--run_name", default=None,
                   help="run folder name (none: the next free number; with --resume auto: the newest run that has "
                        "a last.pt)")
    g.add_argument("--resume", default="",
                   help="'auto' (continue the newest run that has a last.pt; a new run when none has) or a checkpoint path")
    g.add_argument("--log_every", type=int, default=20, help="log line + TensorBoard scalars every N steps")
    g.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep_checkpoints", type=int, default=5, help="numbered checkpoints kept (last.pt and best.pt always)")
    g.add_argument("--eval_every", type=int, default=1000, help="held-out R@1/EER every N steps (0: only at the end)")
    g.add_argument("--eval_max_images", type=int, default=2000, help="cap on held-out images for the periodic evaluation")
    g.add_argument("--eval_langs", default="en", help="caption languages of the periodic evaluation")
    add_loss_args(p)
    return p


# ----------------------------------------------------------------------------- validation (before anything is created)
# Lower bounds of integer flags; a flag the parser does not have is skipped, so new flags only need a line here.
# batch_size >= 2: BatchNorm and the in-batch contrastive terms need two samples
_INT_MIN = {"batch_size": 2, "iters": 1, "feature_dim": 1, "embed_dim": 1, "max_seq_length": 2,
            "vocab_size": 0x254,  # search/charmap.py hashes non-Latin code points into rows 0x253 .. vocab_size-1
            "save_every": 1, "log_every": 1, "keep_checkpoints": 1, "max_bad_steps": 1, "instances_per_id": 1,
            "eval_max_images": 1, "rkd_max_rows": 2, "workers": 0, "eval_every": 0, "seed": 0, "memory_size": 0,
            "memory_warmup": 0, "warmup": -1, "top_k": 0, "filler_words": 0}
# float flags: (low, high, low inclusive); names not listed follow the suffix rules below
_FLOAT_RANGE = {"lr": (0.0, 10.0, False), "weight_decay": (0.0, 10.0, True), "grad_clip": (0.0, float("inf"), True),
                "min_lr_ratio": (0.0, 1.0, True), "test_ratio": (0.0, 1.0, True), "id_temp": (0.0, 100.0, False),
                "dist_rel_t_temp": (0.0, 100.0, True),  # 0 = auto
                "dist_rel_s_temp": (-1.0, 100.0, True)}  # 0 = auto, -1 = the teacher's
_SUFFIX_RANGE = (("_weight", (0.0, float("inf"), True)), ("_prob", (0.0, 1.0, True)), ("_ratio", (0.0, 1.0, True)))


def _device_problem(dev):
    import torch
    if dev in ("auto", "cpu"):
        return None
    if dev == "cuda" or dev.startswith("cuda:"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return f"--device {dev}: no CUDA GPU is available here (use --device cpu or auto)"
        idx = dev[5:]
        if idx and (not idx.isdigit() or int(idx) >= n):
            return f"--device {dev}: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})"
        return None
    return f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}"


def arg_problems(args):
    """Every problem with the trainer's flags as one-line messages (empty: all good). Checks only flags the
    namespace has, so it works with parents that add or lack flags."""
    import math
    from pathlib import Path

    out = []
    a = vars(args)
    for k, v in a.items():
        if isinstance(v, float) and not math.isfinite(v):
            out.append(f"--{k} must be a finite number, got {v}")
    for k, lo in _INT_MIN.items():
        v = a.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v < lo:
            out.append(f"--{k} must be >= {lo}, got {v}")
    for k, v in a.items():
        if not isinstance(v, float) or not math.isfinite(v):
            continue
        rng = _FLOAT_RANGE.get(k) or next((r for suf, r in _SUFFIX_RANGE if k.endswith(suf)), None)
        if rng is None:
            continue
        lo, hi, lo_incl = rng
        if (v < lo or (v == lo and not lo_incl)) or v > hi:
            low = f"{'>=' if lo_incl else '>'} {lo:g}"
            out.append(f"--{k} must be {low}" + (f" and <= {hi:g}" if hi != float("inf") else "") + f", got {v:g}")
    if isinstance(a.get("test_ratio"), float) and a["test_ratio"] >= 1.0:
        out.append(f"--test_ratio must be < 1 (1 holds out every identity), got {a['test_ratio']:g}")
    from data import LANGS
    for k in ("langs", "eval_langs"):
        if isinstance(a.get(k), str):
            langs = [s.strip() for s in a[k].split(",") if s.strip()]
            bad = [s for s in langs if s not in LANGS]
            if not langs or bad:
                out.append(f"--{k} must be a comma-separated subset of {','.join(LANGS)}, got {a[k]!r}")
    if isinstance(a.get("device"), str):
        p = _device_problem(a["device"])
        if p:
            out.append(p)
    if isinstance(a.get("backbone"), str) and not a.get("text_only"):
        from backbone import is_known_backbone, list_backbones
        if not is_known_backbone(a["backbone"]):
            out.append(f"--backbone {a['backbone']!r}: unknown; one of {', '.join(list_backbones())}")
    if isinstance(a.get("text_backbone"), str):
        from text_encoder import list_text_backbones
        if a["text_backbone"] not in list_text_backbones():
            out.append(f"--text_backbone {a['text_backbone']!r}: unknown; one of {', '.join(list_text_backbones())}")
    for k, kind in (("data", "file"), ("backbone_weights", "file"), ("embedding_path", "dir"), ("image_root", "dir")):
        v = a.get(k)
        if v and not (Path(v).is_file() if kind == "file" else Path(v).is_dir()):
            out.append(f"--{k} {v}: no such {'file' if kind == 'file' else 'folder'}")
    if a.get("output_dir") and Path(a["output_dir"]).exists() and not Path(a["output_dir"]).is_dir():
        out.append(f"--output_dir {a['output_dir']}: exists and is not a folder")
    r = a.get("resume")
    if r and r != "auto" and not Path(r).is_file():
        out.append(f"--resume {r}: no such checkpoint file (or pass --resume auto)")
    return out


def validate_args(args):
    """Refuse bad flags with one `error: ...` line (exit 2) before anything is created or loaded."""
    problems = arg_problems(args)
    if problems:
        from cli import fail
        fail("; ".join(problems))
