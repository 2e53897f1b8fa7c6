"""Speed of the student against the SigLIP so400m teacher, search, evaluation and training, in ONE run on ONE machine.

    python bench/speed.py                              # everything, ~30 min on 2 busy cores
    python bench/speed.py --sections image,text --big 8 2>&1 | tee bench/results_speed.txt   # README table, < 10 min
    python bench/speed.py --quick                      # < 5 min: teacher at batch 1 and 4, galleries 10k and 100k
    python bench/speed.py --smoke                      # seconds: tiny teacher/student/galleries (tests/test_bench.py)
    python bench/speed.py --threads 4 --backbone mobile_base --text_backbone char_base --feature_dim 256
    python bench/speed.py --families none --text_families none --no_int8   # only the recipe, fp32
    python bench/speed.py --checkpoint logs/expModel-mobile_small-224x112-512/1/last.pt   # or an export folder
    python bench/speed.py --sections image,text        # only some of: image,text,search,eval,train

Why one script: the CPU is shared and noisy, so every comparison is a side-by-side ratio of two figures measured
in the same process, minutes apart, with the same thread count (torch.set_num_threads = ONNX Runtime
intra_op_num_threads = faiss OpenMP threads = --threads; printed in the header with the load average before and
after). Every figure is the MEDIAN of the timed runs; warm-up and timed run counts are printed beside it, and for
the encoders the spread, (max - min) / median. The student's timed runs are interleaved with the teacher's (one
teacher run, then a share of the student's runs, round after round), so a neighbour's job starting or stopping
hits both sides of a ratio. OMP_WAIT_POLICY is set to PASSIVE (see --omp_wait_policy): with libgomp's default
spinning, 2-thread PyTorch ran up to 13x slower on this busy 2-core machine, which would inflate the teacher's
time (ONNX Runtime's pools in search/ never spin).

Students: the shipped recipe (res_tiny / char_tiny at 192x96, D 256: quickstart.sh and bench/quality.py's RECIPE),
the same recipe exported with --static_shapes --batch 1 --text_length 64 (what an NPU gets), and the other families
of the README's model table (--families image backbones, --text_families text encoders, all at --image_size), each
as exported fp32 ONNX and as int8 (export_model.to_int8, the quantiser of export_model.py --int8: QDQ, per-channel
weights, static activation ranges, here calibrated on synthetic images and the bench's captions; random weights, so
no parity gate: speed only). All of them run interleaved with the same so400m runs, so their ratios come from one
run. Targets (headline): image >= 1000x and text >= 300x faster than so400m at batch 1 (text at L=64), and the
recipe's int8 text model + character table <= 8 MiB.

1. Image encoders. The student's model_image.onnx on ONNX Runtime (what search/ runs; exported by export_model.py
   from a randomly initialised student of the given sizes, or from --checkpoint; speed does not depend on the
   weights) against the SigLIP so400m vision tower: google/siglip2-so400m-patch16-512's architecture
   (SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
   patch_size=16, image_size=512), random weights), SiglipVisionModel in PyTorch fp32 eval (the way
   tools/extract_label.py runs it). Preprocessed tensors in, embeddings out: image decoding/resizing is excluded
   on both sides. Batch 1 and 32 (--quick: 1 and 4). The student in PyTorch eval is shown as a same-runtime
   reference.
2. Text encoders. The student's model_text.onnx INCLUDING the numpy character mapping and table lookup
   (search.engine.TextEncoder.encode, exactly what a search query costs) against the so400m text tower
   (SiglipTextConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
   max_position_embeddings=64, vocab_size=256000 (SigLIP2's Gemma vocabulary), projection_size=1152)) on token
   ids at L=64 (SigLIP pads every text to 64). The student also runs at L=64 here (captions >= 63 characters);
   the teacher's tokenizer time is NOT counted (there is none offline), which favours the teacher.
3. Search: bench/search_speed.py on this student (its docstring): galleries tiled from the student's embeddings of
   rendered synthetic people, every search/index.py option (flat, ivf, ivf_fp16, ivf_sq8, hnsw, auto) with
   recall@10 against exact, p50/p90 query latency, build and tuning time and index RAM.
4. Evaluation. metrics.verification and metrics.retrieval (text->image) on 1,000 images x 25,000 captions
   (25M pairs, D = feature_dim; bench/eval_speed.py's identity-structured float16 embeddings).
5. Training. Steps/s of main.py's training step (main.Distiller: student + losses.build_criterion with main.py's
   defaults, AdamW, grad clip) on synthetic tensors at batch 64, CPU fp32, with the forward / backward / optimizer
   split; and whether the data loader keeps up: data.DistillDataset items (train transform, no teacher cache:
   zeros) from a tools/make_synthetic_pedes.py --ids 50 --images_per_id 4 dataset in a temp dir, in-process per
   item and through a DataLoader with --workers workers (measured alone; in training the workers share the cores
   with the step, which is why the loader's CPU share of a step is printed too).

--smoke replaces every size with a tiny one (tiny SigLIP configs, res_tiny/char_tiny (+ mobile_tiny / char_small) at
64x32, galleries of
1k/5k, 50x500 evaluation, batch 8): its numbers mean nothing; it checks that the script runs end to end.
"""
import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opts import parse_image_size  # noqa: E402  (argparse only: keeps --help and bad-flag errors fast)

SECTIONS = ("image", "text", "search", "eval", "train")
SO400M = "google/siglip2-so400m-patch16-512"
TEACHER_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      patch_size=16, image_size=512)
TEACHER_TEXT = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    max_position_embeddings=64, vocab_size=256000, projection_size=1152)
SMOKE_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                    image_size=64)
SMOKE_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, vocab_size=1000, projection_size=32, pad_token_id=1, bos_token_id=2,
                  eos_token_id=3)
IMAGE_TARGET, TEXT_TARGET, TEXT_MIB_TARGET = 1000, 300, 8.0

# Captions of >= 63 characters: the student then runs at L = 64 (CLS + 63), like SigLIP's padded 64 tokens.
LONG_CAPTIONS = [
    "a young man wearing a black t-shirt, blue jeans and white sneakers, carrying a grey backpack on his back",
    "the woman has long brown hair and wears a red coat over a white sweater, black trousers and brown boots",
    "an older man in a dark blue jacket, khaki pants and black leather shoes is holding a folded umbrella",
    "girl with a ponytail, pink hoodie, denim shorts and white sandals, a small yellow bag over her shoulder",
    "这位女士留着黑色长发，戴着一副眼镜，穿着一件白色衬衫和一条黑色长裙，"
    "脚穿红色高跟鞋，手里拿着一个棕色的手提包，正沿着马路边慢慢地向前行走",
    "a person in a green raincoat with the hood up, grey sweatpants, orange running shoes, pushing a bicycle",
    "short-haired man, light purple polo shirt tucked into beige chinos, brown belt, loafers, glasses on",
    "a woman wearing a beige trench coat, a striped scarf, dark green trousers and black ankle boots, phone in hand",
]
# What people type into a search box: short, mixed languages.
QUERIES = ["a woman in a red coat with a black handbag", "man with a blue shirt and black trousers",
           "穿红色外套的女人", "girl in a white dress carrying an umbrella",
           "old man, grey jacket, walking stick", "person with a yellow backpack and green shoes"]


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("Student vs SigLIP so400m speed benchmark", add_help=add_help)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="< 5 min: teacher at batch 1 and 4 (not 32), galleries 10k and 100k, cheaper HNSW build")
    g.add_argument("--smoke", action="store_true", help="tiny everything, seconds (for tests; numbers mean nothing)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads = ONNX Runtime intra_op_num_threads = faiss OpenMP threads")
    p.add_argument("--backbone", default="res_tiny",
                   help="student image backbone (backbone.list_backbones()); default: the shipped recipe's")
    p.add_argument("--text_backbone", default="char_tiny",
                   help="student text encoder: char_tiny (the recipe's), char_small, char_base")
    p.add_argument("--feature_dim", type=int, default=256, help="student embedding size (= gallery/eval D)")
    p.add_argument("--image_size", type=parse_image_size, default=(192, 96), help="student input HxW (every family)")
    p.add_argument("--families", default="res_small,mobile_tiny,mobile_small,repconv_tiny,tv_mobilenet_v3_small",
                   help="other image backbones timed in the same run (comma list, or 'none')")
    p.add_argument("--text_families", default="char_small,char_base",
                   help="other text encoders timed in the same run (comma list, or 'none')")
    p.add_argument("--no_int8", action="store_true",
                   help="skip the int8 graphs (export_model.to_int8, calibrated on synthetic inputs: speed only)")
    p.add_argument("--big", type=int, default=None, help="the large batch of sections 1-2 (default: 32, --quick 4)")
    p.add_argument("--checkpoint", default=None,
                   help="a main.py checkpoint (.pt, exported into a temp dir) or an export_model.py folder "
                        "(model_info.json); replaces the random student and its size flags")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader check")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of: {','.join(SECTIONS)}")
    p.add_argument("--omp_wait_policy", choices=["passive", "active", "inherit"], default="passive",
                   help="OMP_WAIT_POLICY for torch's and faiss's OpenMP pools, set before they load. passive: idle "
                        "threads sleep, as ONNX Runtime's do in search/ (allow_spinning 0). On a shared, busy CPU "
                        "spinning threads wait for descheduled partners: 2-thread torch ran up to 13x slower here. "
                        "inherit: leave the environment as it is")
    p.add_argument("--seed", type=int, default=0)
    return p


# ------------------------------------------------------------------------------------------------ plan
def make_plan(args):
    """Sizes and repeat counts per mode. (warm-up, timed runs) pairs; the median of the timed runs is reported."""
    if args.smoke:
        return dict(mode="smoke", big=8, t_img=((1, 2), (0, 1)), t_txt=((1, 2), (0, 1)),
                    s_runs=((2, 5), (1, 3)), galleries=(1_000, 5_000), uniform_n=1_000, n_queries=20,
                    hnsw=[(16, 40)], hnsw_max_n=5_000, ivf_max_n=5_000, eval=(50, 500), train_bs=8,
                    train_steps=(1, 2), synth=dict(ids=4, images_per_id=2, height=128, width=64),
                    loader_batches=2, item_runs=8)
    if args.quick:
        # no so400m warm-up in quick mode: a pass takes 10-20 s, its first-call overhead measured ~1%
        return dict(mode="quick", big=4, t_img=((0, 1), (0, 1)), t_txt=((1, 3), (0, 1)),
                    s_runs=((5, 50), (2, 10)), galleries=(10_000, 100_000), uniform_n=10_000, n_queries=100,
                    hnsw=[(16, 64)], hnsw_max_n=100_000, ivf_max_n=10_000, eval=(1_000, 25_000), train_bs=64,
                    train_steps=(1, 2), synth=dict(ids=50, images_per_id=4, height=256, width=128),
                    loader_batches=6, item_runs=64)
    return dict(mode="full", big=32, t_img=((1, 2), (0, 1)), t_txt=((1, 3), (0, 2)),
                s_runs=((5, 50), (2, 10)), galleries=(10_000, 100_000, 1_000_000), uniform_n=10_000, n_queries=100,
                hnsw=[(32, 200), (16, 64)], hnsw_max_n=1_000_000, ivf_max_n=1_000_000, eval=(1_000, 25_000),
                train_bs=64, train_steps=(1, 4), synth=dict(ids=50, images_per_id=4, height=256, width=128),
                loader_batches=8, item_runs=64)


# ------------------------------------------------------------------------------------------------ helpers
def timed(fn, warmup, runs):
    """-> (median seconds, list of run seconds). fn's result is discarded."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def fmt_ms(s):
    if s is None:
        return "n/a"
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def fmt_x(r):
    if r is None or not math.isfinite(r):
        return "n/a"
    return f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def fmt_n(n):
    return f"{n / 1e6:.0f}M" if n >= 1e6 and n % 1_000_000 == 0 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def fmt_params(n):
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def mib(n_bytes):
    return f"{n_bytes / 2**20:,.1f}"


def print_table(headers, rows):
    rows = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))  # noqa
    print(line(headers))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))


_SECTION_T0 = [None]


def section(title):
    if _SECTION_T0[0] is not None:
        print(f"(section took {time.perf_counter() - _SECTION_T0[0]:.0f}s)")
    _SECTION_T0[0] = time.perf_counter()
    print(f"\n== {title} ==", flush=True)


def load_avg():
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


@contextlib.contextmanager
def quiet():
    """Swallow stdout/stderr of chatty callees (export tables, HF warnings); re-raise with the tail shown."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    except BaseException:
        tail = buf.getvalue().strip().splitlines()[-15:]
        if tail:
            print("\n".join(tail), file=sys.stderr)
        raise


def onnx_params(path):
    import numpy as np
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer))


# ------------------------------------------------------------------------------------------------ student
def prepare_student(args, tmp, backbone=None, text_backbone=None, name="student", export_flags=()):
    """-> (export info dict via search.engine.load_export, torch model or None, description). Default: --checkpoint,
    or a random student of the size flags; backbone/text_backbone: a random student of that family instead."""
    import torch
    import export_model
    from checkpoint import save_checkpoint
    from model import build_model, default_model_cfg
    from search.engine import ExportError, load_export

    model, ckpt = None, None
    src = None if backbone else args.checkpoint
    if src and Path(src).is_dir():
        try:
            info = load_export(src)
        except ExportError as e:
            raise SystemExit(f"error: --checkpoint {src}: {e}")
        return info, None, f"export folder {src}"
    if src:
        try:
            model, _, _ = export_model.load_model(src)
        except export_model.ExportFailure as e:
            raise SystemExit(f"error: --checkpoint {src}: {e}")
        ckpt, desc = src, f"checkpoint {src}"
    else:
        torch.manual_seed(args.seed)
        teacher_dim = (SMOKE_TEXT if args.smoke else TEACHER_TEXT)["projection_size"]
        # max_seq_length 64: the text table compares both towers at L=64 (SigLIP pads every text to 64 tokens)
        cfg = default_model_cfg(dict(backbone=backbone or args.backbone,
                                     text_backbone=text_backbone or args.text_backbone,
                                     feature_dim=args.feature_dim, image_size=list(args.image_size),
                                     max_seq_length=64),
                                teacher_dim=teacher_dim, teacher_name=SO400M)
        try:
            model = build_model(cfg).eval()
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        ckpt = os.path.join(tmp, f"{name}.pt")
        save_checkpoint(ckpt, {"model": model.state_dict(), "model_cfg": cfg, "args": {}, "step": 0})
        desc = "randomly initialised student (speed does not depend on the weights)"
    out = os.path.join(tmp, f"export_{name}")
    eargs = export_model.get_args_parser().parse_args([ckpt, out, *export_flags])
    t0 = time.perf_counter()
    try:
        with quiet(), torch.no_grad():
            export_model.export(eargs)
    except export_model.ExportFailure as e:
        raise SystemExit(f"error: student export failed: {e}")
    print(f"{name}: {desc}; exported with export_model.export in {time.perf_counter() - t0:.1f}s", flush=True)
    return load_export(out), model.eval(), desc


def make_int8(info, out_dir):
    """int8 copies of an export's graphs and table for timing: export_model.to_int8 (the --int8 quantiser: QDQ,
    per-channel weights, static activation ranges) calibrated on synthetic person images and the bench's captions
    and queries; export_model.py --int8 gates real models on held-out parity, random weights have none to keep.
    Written into out_dir (never into a --checkpoint export folder, whose own int8 files passed their parity check).
    -> info dict pointing at the int8 files (search.engine encoders take it as it is)."""
    import numpy as np
    import onnx
    import export_model
    from search import charmap
    from search.engine import preprocess

    out = dict(info)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    st = info.get("static_shapes")
    bs, L = (st["batch"], st["text_length"]) if st else (8, info["max_seq_length"])
    if info.get("_image_model"):
        ims = [preprocess(im, None, info["image_size"], info["mean"], info["std"])
               for _, im in export_model.synthetic_images(32, seed=1)]
        feeds = [f for f, _ in export_model.batches({"image": np.stack(ims)}, bs, bool(st))]
        p = d / "model_image.int8.onnx"
        with quiet():
            p.write_bytes(export_model.to_int8(onnx.load(info["_image_model"]), feeds))
        out["_image_model"] = str(p)
    table = charmap.load_table(info["_input_embeddings"])
    texts = LONG_CAPTIONS + QUERIES + [c[:n] for c in LONG_CAPTIONS for n in (0, 8, 24)]
    arrays = export_model.text_arrays(texts, table, L, info["vocab_size"])
    p = d / "model_text.int8.onnx"
    with quiet():
        p.write_bytes(export_model.to_int8(onnx.load(info["_text_model"]),
                                           [f for f, _ in export_model.batches(arrays, bs, bool(st))]))
    out["_text_model"] = str(p)
    t = d / charmap.TABLE_FILES["int8"]
    t.write_bytes(charmap.table_bytes(table, "int8"))
    out["_input_embeddings"] = str(t)
    return out


def prepare_students(args, tmp):
    """The primary student (the recipe, or --checkpoint) and the other families, each exported, with int8 copies.
    -> list of dict(name, info, int8 (info or None), model (torch, primary only), image (time it), text (time it))."""
    def fam(flag):
        return [] if flag.strip().lower() in ("", "none") else [f.strip() for f in flag.split(",") if f.strip()]

    info, model, _ = prepare_student(args, tmp)
    students = [dict(name="primary", info=info, model=model, image=bool(info.get("_image_model")), text=True, tag="")]
    if not args.checkpoint:  # the recipe as an NPU gets it: export_model.py --static_shapes --batch 1 --text_length 64
        inf, _, _ = prepare_student(args, tmp, backbone=args.backbone, text_backbone=args.text_backbone,
                                    name="static", export_flags=("--static_shapes", "--batch", "1", "--text_length",
                                                                 "64"))
        students.append(dict(name="static", info=inf, model=None, image=bool(inf.get("_image_model")), text=True,
                             tag=" (static shapes)"))
    img_f, txt_f = fam(args.families), fam(args.text_families)
    for i in range(max(len(img_f), len(txt_f))):  # one export per pair: family i's image and text tower
        b = img_f[i] if i < len(img_f) else args.backbone
        t = txt_f[i] if i < len(txt_f) else args.text_backbone
        inf, _, _ = prepare_student(args, tmp, backbone=b, text_backbone=t, name=f"family{i}")
        students.append(dict(name=f"family{i}", info=inf, model=None, image=i < len(img_f), text=i < len(txt_f),
                             tag=""))
    for st in students:
        st["int8"] = None
        if not args.no_int8:
            t0 = time.perf_counter()
            st["int8"] = make_int8(st["info"], os.path.join(tmp, f"int8_{st['name']}"))
            print(f"{st['name']} ({st['info'].get('backbone')} / {st['info'].get('text_backbone')}): int8 graphs "
                  f"calibrated and written in {time.perf_counter() - t0:.1f}s", flush=True)
    return students


# ------------------------------------------------------------------------------------------------ teacher
def build_siglip(kind, cfg_kwargs, seed):
    """SiglipVisionModel / SiglipTextModel with random weights, eval, fp32. Skips the HF initialisers (~30 s for
    so400m on 2 cores) and fills the parameters directly when the installed transformers allows it."""
    import torch
    from transformers import SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel

    cfg_cls, cls = (SiglipVisionConfig, SiglipVisionModel) if kind == "vision" else (SiglipTextConfig, SiglipTextModel)
    with quiet():
        config = cfg_cls(**cfg_kwargs)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = None
    with quiet():
        if no_init_weights is None:
            return cls(config).eval()
        with no_init_weights():
            m = cls(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():  # uninitialised memory otherwise: NaN / denormals would skew speed
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        ok = all(torch.isfinite(b).all() and (not n.endswith("position_ids")
                                               or torch.equal(b.flatten(), torch.arange(b.numel())))
                 for n, b in m.named_buffers())
    if not ok:  # a transformers version that initialises buffers in init_weights: build it the slow way
        with quiet():
            m = cls(config)
    return m.eval()


def n_params(module):
    return int(sum(p.numel() for p in module.parameters()))


# ------------------------------------------------------------------------------------------------ 1./2. encoders
def interleaved(t_fn, t_warm, t_runs, s_fns, s_warm, s_runs):
    """Teacher run, then a share of every student's runs, round after round, so that slow changes of the machine's
    load (the neighbours' jobs starting and stopping) hit both sides of a ratio alike.
    -> (teacher run seconds, [run seconds of each student fn])."""
    def once(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    for _ in range(t_warm):
        t_fn()
    for f in s_fns:
        for _ in range(s_warm):
            f()
    per = max(1, math.ceil(s_runs / t_runs))
    t_times, s_times = [], [[] for _ in s_fns]
    for _ in range(t_runs):
        t_times.append(once(t_fn))
        for f, ts in zip(s_fns, s_times):
            ts.extend(once(f) for _ in range(per))
    return t_times, s_times


def spread(ts):
    """(max - min) / median of the timed runs: how noisy the figure is ("-" for a single run)."""
    return f"{100 * (max(ts) - min(ts)) / statistics.median(ts):.0f}%" if len(ts) > 1 else "-"


def encoder_table(rows, big):
    print_table(["model", "params", "fp32 MiB", "file MiB", "b1 ms/item", f"b{big} ms/item",
                 f"runs b1 / b{big} (warm-up+timed)", f"spread b1 / b{big}"], rows)


def speedup_table(title, rows):
    print(title)
    print_table(["student (ONNX Runtime)", "file MiB fp32 / int8", "b1 ms fp32 / int8",
                 "speed-up fp32 / int8 (b1)", "target"], rows)


def bench_image(args, plan, students, teacher_label):
    import numpy as np
    import torch
    from search.engine import ImageEncoder

    big = plan["big"]
    (tw1, tr1), (twb, trb) = plan["t_img"]
    (sw1, sr1), (swb, srb) = plan["s_runs"]
    vcfg = SMOKE_VISION if args.smoke else TEACHER_VISION
    t0 = time.perf_counter()
    teacher = build_siglip("vision", vcfg, args.seed)
    tp = n_params(teacher)
    side = vcfg["image_size"]
    print(f"teacher vision tower: {teacher_label}, {tp / 1e6:.1f}M params, built in {time.perf_counter() - t0:.1f}s, "
          f"input {side}x{side}, attention '{teacher.config._attn_implementation}'; the student's runs are "
          f"interleaved with the teacher's", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    x1, xb = torch.randn(1, 3, side, side, generator=g), torch.randn(big, 3, side, side, generator=g)

    timed_students = [st for st in students if st["image"]]
    s_fns = {1: [], big: []}
    labels, keys = [], []  # keys: (student index, "fp32"|"int8"|"torch")
    rng = np.random.default_rng(args.seed)
    for si, st in enumerate(timed_students):
        info = st["info"]
        H, W = info["image_size"]
        a = {1: rng.standard_normal((1, 3, H, W), dtype=np.float32),
             big: rng.standard_normal((big, 3, H, W), dtype=np.float32)}
        for kind, inf in (("fp32", info), ("int8", st["int8"])):
            if inf is None:
                continue
            enc = ImageEncoder(inf, threads=args.threads)
            for b in (1, big):
                s_fns[b].append(lambda x=a[b], e=enc: e.encode_arrays(x))
            sp = onnx_params(inf["_image_model"])
            labels.append((f"student {info.get('backbone')} {H}x{W}{st['tag']} (ONNX Runtime {kind})", fmt_params(sp),
                           mib(4 * sp), mib(os.path.getsize(inf["_image_model"]))))
            keys.append((si, kind))
        if st["model"] is not None:
            smodel = st["model"]
            for b in (1, big):
                s_fns[b].append(lambda x=torch.from_numpy(a[b]): smodel.encode_image(x))
            pp = sum(p.numel() for n, p in smodel.named_parameters() if not n.startswith("text_encoder."))
            labels.append((f"student {info.get('backbone')} (PyTorch eval, unfolded, reference)", fmt_params(pp),
                           mib(4 * pp), "-"))
            keys.append((si, "torch"))
    with torch.inference_mode():
        t1, s1 = interleaved(lambda: teacher(pixel_values=x1).pooler_output, tw1, tr1, s_fns[1], sw1, sr1)
        print(f"  batch 1: teacher {fmt_ms(statistics.median(t1))} ms/item", flush=True)
        tb, sb = interleaved(lambda: teacher(pixel_values=xb).pooler_output, twb, trb, s_fns[big], swb, srb)
        print(f"  batch {big}: teacher {fmt_ms(statistics.median(tb) / big)} ms/item", flush=True)
    del teacher
    T1, TB = statistics.median(t1), statistics.median(tb) / big
    rows = [[f"SigLIP {teacher_label} vision (PyTorch fp32)", fmt_params(tp), mib(4 * tp), "-", fmt_ms(T1),
             fmt_ms(TB), f"{tw1}+{len(t1)} / {twb}+{len(tb)}", f"{spread(t1)} / {spread(tb)}"]]
    if not timed_students:
        print("student: text-only export (no model_image.onnx): no image comparison")
        encoder_table(rows, big)
        return None
    meds = {}
    for lab, key, r1, rb in zip(labels, keys, s1, sb):
        meds[key] = (statistics.median(r1), statistics.median(rb) / big)
        rows.append([*lab, fmt_ms(meds[key][0]), fmt_ms(meds[key][1]), f"{sw1}+{len(r1)} / {swb}+{len(rb)}",
                     f"{spread(r1)} / {spread(rb)}"])
    rows.append(["speed-up SigLIP / student ONNX", "", "", "", fmt_x(T1 / meds[(0, "fp32")][0]),
                 fmt_x(TB / meds[(0, "fp32")][1]), "", ""])
    if (0, "torch") in meds:
        rows.append(["speed-up SigLIP / student PyTorch (same runtime)", "", "", "", fmt_x(T1 / meds[(0, "torch")][0]),
                     fmt_x(TB / meds[(0, "torch")][1]), "", ""])
    rows.append(["size ratio (params)", fmt_x(tp / onnx_params(timed_students[0]["info"]["_image_model"])),
                 "", "", "", "", "", ""])
    encoder_table(rows, big)
    out = {}
    srows = []
    for si, st in enumerate(timed_students):
        f32, i8 = meds[(si, "fp32")][0], meds.get((si, "int8"), (None,))[0]
        out[si] = (T1 / f32, T1 / i8 if i8 else None)
        sz = [mib(os.path.getsize(x["_image_model"])) for x in (st["info"], st["int8"]) if x]
        srows.append([f"{st['info'].get('backbone')} {'x'.join(map(str, st['info']['image_size']))}{st['tag']}"
                      + (" (the recipe)" if si == 0 and not args.checkpoint else ""),
                      " / ".join(sz), f"{fmt_ms(f32)} / {fmt_ms(i8)}", f"{fmt_x(out[si][0])} / {fmt_x(out[si][1])}",
                      f">= {IMAGE_TARGET}x"])
    speedup_table(f"image speed-up over SigLIP {teacher_label} at batch 1, every family in this run:", srows)
    return out


def bench_text(args, plan, students, teacher_label):
    import torch
    from search.charmap import encode_batch, normalize_text
    from search.engine import TextEncoder

    big = plan["big"]
    (tw1, tr1), (twb, trb) = plan["t_txt"]
    (sw1, sr1), (swb, srb) = plan["s_runs"]
    tcfg = SMOKE_TEXT if args.smoke else TEACHER_TEXT
    L = tcfg["max_position_embeddings"]
    t0 = time.perf_counter()
    teacher = build_siglip("text", tcfg, args.seed)
    tp = n_params(teacher)
    emb_p = tcfg["vocab_size"] * tcfg["hidden_size"]
    print(f"teacher text tower: {teacher_label}, {tp / 1e6:.1f}M params (of which the {tcfg['vocab_size']:,}-token "
          f"{'Gemma ' if not args.smoke else ''}vocabulary table {emb_p / 1e6:.1f}M, a lookup), built in "
          f"{time.perf_counter() - t0:.1f}s; token ids at L={L}, tokenizer time not counted; the student's runs are "
          f"interleaved with the teacher's", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    ids = {1: torch.randint(0, tcfg["vocab_size"], (1, L), generator=g),
           big: torch.randint(0, tcfg["vocab_size"], (big, L), generator=g)}

    caps = [LONG_CAPTIONS[i % len(LONG_CAPTIONS)] for i in range(big)]
    avg_chars = sum(len(normalize_text(q)) for q in QUERIES) / len(QUERIES)
    timed_students = [st for st in students if st["text"]]
    s_fns = {1: [], big: []}
    labels, keys, sizes = [], [], {}
    for si, st in enumerate(timed_students):
        for kind, inf in (("fp32", st["info"]), ("int8", st["int8"])):
            if inf is None:
                continue
            enc = TextEncoder(inf, threads=args.threads)
            sL = min(enc.max_seq_length, min(len(normalize_text(c)) for c in caps) + 1)
            s_fns[1].append(lambda e=enc: e.encode(caps[:1]))
            s_fns[big].append(lambda e=enc: e.encode(caps))
            sp = onnx_params(inf["_text_model"]) + int(enc.table.size)
            files = os.path.getsize(inf["_text_model"]) + os.path.getsize(inf["_input_embeddings"])
            sizes[(si, kind)] = files
            labels.append((f"student {inf.get('text_backbone')}{st['tag']} (charmap + lookup + ONNX Runtime {kind}), "
                           f"L={sL}",
                           fmt_params(sp), mib(4 * sp), mib(files)))
            keys.append((si, kind))
            if si == 0:
                query_i = [0]

                def one_query(e=enc, qi=query_i):  # a short text, run on only the characters it has (dynamic L)
                    e.encode([QUERIES[qi[0] % len(QUERIES)]])
                    qi[0] += 1
                s_fns[1].append(one_query)
                s_fns[big].append(None)
                labels.append((f"student, typical search query ({len(QUERIES)} queries, avg {avg_chars:.0f} chars, "
                               f"dynamic L, {kind})", "", "", ""))
                keys.append((si, kind + "-query"))
        if st["model"] is not None:
            smodel = st["model"]
            ml, V = smodel.cfg["max_seq_length"], smodel.cfg["vocab_size"]
            for b, cs in ((1, caps[:1]), (big, caps)):
                i_, m_ = (torch.from_numpy(a) for a in encode_batch(cs, ml, V))
                s_fns[b].append(lambda i_=i_, m_=m_: smodel.encode_text(i_, m_))
            labels.append((f"student {st['info'].get('text_backbone')} (PyTorch eval, reference; charmap not timed)",
                           fmt_params(n_params(smodel.text_encoder)), mib(4 * n_params(smodel.text_encoder)), "-"))
            keys.append((si, "torch"))
    big_idx = [i for i, f in enumerate(s_fns[big]) if f is not None]
    with torch.inference_mode():
        t1, s1 = interleaved(lambda: teacher(input_ids=ids[1]).pooler_output, tw1, tr1, s_fns[1], sw1, sr1)
        tb, sb_ = interleaved(lambda: teacher(input_ids=ids[big]).pooler_output, twb, trb,
                              [s_fns[big][i] for i in big_idx], swb, srb)
    del teacher
    sb = [None] * len(s_fns[big])
    for i, r in zip(big_idx, sb_):
        sb[i] = r
    T1, TB = statistics.median(t1), statistics.median(tb) / big
    rows = [[f"SigLIP {teacher_label} text (PyTorch fp32), L={L}", fmt_params(tp), mib(4 * tp), "-", fmt_ms(T1),
             fmt_ms(TB), f"{tw1}+{len(t1)} / {twb}+{len(tb)}", f"{spread(t1)} / {spread(tb)}"]]
    meds = {}
    for lab, key, r1, rb in zip(labels, keys, s1, sb):
        meds[key] = (statistics.median(r1), statistics.median(rb) / big if rb else None)
        rows.append([*lab, fmt_ms(meds[key][0]), fmt_ms(meds[key][1]) if rb else "-",
                     f"{sw1}+{len(r1)} / " + (f"{swb}+{len(rb)}" if rb else "-"),
                     f"{spread(r1)} / " + (spread(rb) if rb else "-")])
    rows.append(["speed-up SigLIP / student ONNX", "", "", "", fmt_x(T1 / meds[(0, "fp32")][0]),
                 fmt_x(TB / meds[(0, "fp32")][1]), "", ""])
    rows.append([f"speed-up SigLIP (L={L}) / student typical query", "", "", "",
                 fmt_x(T1 / meds[(0, "fp32-query")][0]), "", "", ""])
    if (0, "torch") in meds:
        rows.append(["speed-up SigLIP / student PyTorch (same runtime)", "", "", "", fmt_x(T1 / meds[(0, "torch")][0]),
                     fmt_x(TB / meds[(0, "torch")][1]), "", ""])
    enc0 = TextEncoder(timed_students[0]["info"], threads=1)
    sp0 = onnx_params(timed_students[0]["info"]["_text_model"]) + int(enc0.table.size)
    rows.append(["size ratio (params, incl. lookup tables)", fmt_x(tp / sp0), "", "", "", "", "", ""])
    rows.append(["size ratio (params, without lookup tables)", fmt_x((tp - emb_p) / (sp0 - enc0.table.size)),
                 "", "", "", "", "", ""])
    encoder_table(rows, big)
    out, srows = {}, []
    for si, st in enumerate(timed_students):
        f32, i8 = meds[(si, "fp32")][0], meds.get((si, "int8"), (None,))[0]
        out[si] = dict(fp32=T1 / f32, int8=T1 / i8 if i8 else None, mib_fp32=sizes[(si, "fp32")] / 2**20,
                       mib_int8=sizes[(si, "int8")] / 2**20 if (si, "int8") in sizes else None)
        if si == 0:
            out[si]["query"] = T1 / meds[(0, "fp32-query")][0]
            out[si]["avg_chars"] = avg_chars
        srows.append([f"{st['info'].get('text_backbone')}{st['tag']}, L={L}"
                      + (" (the recipe)" if si == 0 and not args.checkpoint else ""),
                      " / ".join(mib(sizes[(si, k)]) for k in ("fp32", "int8") if (si, k) in sizes)
                      + " (graph + table)", f"{fmt_ms(f32)} / {fmt_ms(i8)}",
                      f"{fmt_x(out[si]['fp32'])} / {fmt_x(out[si]['int8'])}", f">= {TEXT_TARGET}x"])
    speedup_table(f"text speed-up over SigLIP {teacher_label} at batch 1, L={L}, every family in this run:", srows)
    return out


# ------------------------------------------------------------------------------------------------ 3. search
def bench_search(args, plan, info):
    """Section 3 is bench/search_speed.py (student-like galleries, every search/index.py option), run on this
    student at this plan's gallery sizes."""
    from bench import search_speed

    sargs = search_speed.get_args_parser(add_help=False).parse_args([])
    sargs.sizes = ",".join(str(n) for n in plan["galleries"])
    sargs.threads, sargs.seed, sargs.smoke = args.threads, args.seed, args.smoke
    sargs.student_info = info if info.get("_image_model") else None  # a text-only export: search_speed's own
    search_speed.main(sargs)


# ------------------------------------------------------------------------------------------------ 4. eval
def bench_eval(args, plan, feature_dim):
    import metrics
    from bench.eval_speed import make_data

    n_img, n_cap = plan["eval"]
    img, cap, cii, ip, cp = make_data(n_img, n_cap, feature_dim, 5, 3.0, args.seed)
    rows = []
    for name, fn in (("metrics.verification (EER, FRR@FAR, error lists)",
                      lambda: metrics.verification(img, cap, cii, ip, cp)),
                     ("metrics.retrieval text->image (R@K, mAP, mINP)",
                      lambda: metrics.retrieval(cap, cp, img, ip)),
                     ("metrics.retrieval image->text", lambda: metrics.retrieval(img, ip, cap, cp))):
        c0 = time.process_time()
        t, _ = timed(fn, 0, 1)
        rows.append([name, f"{t:.2f}", f"{time.process_time() - c0:.2f}", f"{n_img * n_cap / t / 1e6:.0f}"])
    print_table(["", "wall s", "CPU s", "M pairs/s"], rows)
    print(f"{n_img:,} images x {n_cap:,} captions = {n_img * n_cap / 1e6:.1f}M pairs, D={feature_dim}, float16 "
          f"inputs (bench/eval_speed.py data), 1 run each")


# ------------------------------------------------------------------------------------------------ 5. train
def bench_train(args, plan, smodel_cfg, tmp):
    import torch
    import torch.nn.functional as F

    import data as data_lib
    import losses
    import main as train_main
    import opts
    from model import build_model
    from search.charmap import encode_batch
    from tools.make_synthetic_pedes import generate

    bs = plan["train_bs"]
    t_dim = (SMOKE_TEXT if args.smoke else TEACHER_TEXT)["projection_size"]
    targs = opts.get_args_parser().parse_args([])  # main.py's defaults (losses included)
    cfg = dict(smodel_cfg)
    H, W = cfg["image_size"]
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    crit = losses.build_criterion(targs, cfg["feature_dim"], t_dim)
    dist = train_main.Distiller(model, crit).train()
    opt = torch.optim.AdamW(train_main.param_groups(dist, targs.weight_decay), lr=targs.lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(args.seed)
    ids, mask = encode_batch([LONG_CAPTIONS[i % len(LONG_CAPTIONS)] for i in range(bs)], cfg["max_seq_length"],
                             cfg["vocab_size"])
    batch = dict(image=torch.randn(bs, 3, H, W, generator=g), text_ids=torch.from_numpy(ids),
                 text_mask=torch.from_numpy(mask), pid=torch.arange(bs) // 4, img_row=torch.arange(bs),
                 t_img_emb=F.normalize(torch.randn(bs, t_dim, generator=g), dim=1),
                 t_cap_emb=F.normalize(torch.randn(bs, t_dim, generator=g), dim=1),
                 has_t_img=torch.ones(bs, dtype=torch.bool), has_t_cap=torch.ones(bs, dtype=torch.bool))
    term_names = []
    parts = {"forward (student + losses)": [], "backward": [], "clip + AdamW": [], "step": []}

    def step():
        t0 = time.perf_counter()
        terms = dist(batch)
        total = sum(terms.values())
        term_names[:] = list(terms)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total.backward()
        t2 = time.perf_counter()
        if targs.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(dist.parameters(), targs.grad_clip)
        opt.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t3 - t0

    warm, runs = plan["train_steps"]
    for _ in range(warm):
        step()
    for _ in range(runs):
        for k, v in zip(parts, step()):
            parts[k].append(v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    sps = 1.0 / med["step"]
    print(f"training step: batch {bs}, {H}x{W}, {cfg['backbone']} + {cfg['text_backbone']} -> {cfg['feature_dim']}, "
          f"teacher dim {t_dim}, losses (main.py defaults) {'+'.join(term_names)},\n  "
          f"AdamW, CPU fp32, {warm} warm-up + {runs} timed steps", flush=True)
    print_table(["training step", "median s", "share"],
                [[k, f"{v:.3f}", f"{100 * v / med['step']:.0f}%" if k != "step" else "100%"] for k, v in med.items()]
                + [["steps/s", f"{sps:.3f}", ""], ["images/s", f"{sps * bs:.1f}", ""]])
    del dist, opt, model, crit

    # ---- data loader
    t0 = time.perf_counter()
    sy = plan["synth"]
    with quiet():
        js = generate(os.path.join(tmp, "synth"), sy["ids"], sy["images_per_id"], seed=args.seed,
                      height=sy["height"], width=sy["width"], workers=1)
    records = data_lib.load_records(js)
    ds = data_lib.DistillDataset(records, list(range(len(records))), cache=None, image_size=(H, W), train=True,
                                 max_seq_length=cfg["max_seq_length"], vocab_size=cfg["vocab_size"],
                                 compose_prob=targs.compose_prob, compose_zh_prob=targs.compose_zh_prob,
                                 langs=("en", "zh"), seed=args.seed)
    print(f"loader: tools/make_synthetic_pedes.py --ids {sy['ids']} --images_per_id {sy['images_per_id']} "
          f"({len(records)} JPEGs {sy['height']}x{sy['width']}) in {time.perf_counter() - t0:.1f}s; "
          f"data.DistillDataset train transform -> {H}x{W}, no teacher cache (zero rows)", flush=True)
    n_items = plan["item_runs"]
    item, _ = timed(lambda: [ds[i % len(ds)] for i in range(n_items)], 1, 1)
    item /= n_items
    workers, nb = args.workers, plan["loader_batches"]
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=bs * nb,
                                             generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=workers, drop_last=True,
                                         prefetch_factor=4 if workers > 0 else None)
    t0 = time.perf_counter()
    got = sum(1 for _ in loader)
    lt = time.perf_counter() - t0
    bps = got / lt
    print_table(["data loading", "value"], [
        ["one item in-process (decode + train transform + charmap)", f"{fmt_ms(item)} ms"],
        [f"one batch of {bs} in-process (= CPU per batch)", f"{fmt_ms(item * bs)} ms"],
        [f"DataLoader, {workers} workers: {got} batches incl. start-up", f"{lt:.2f} s = {bps:.2f} batches/s"],
        ["loader CPU per training step (share of one step on "
         f"{args.threads} threads)", f"{100 * item * bs / (med['step'] * args.threads):.1f}%"],
    ])
    print(f"loader keeps up: {'yes' if bps >= sps else 'no'} ({bps:.2f} batches/s vs {sps:.3f} steps/s)")


# ------------------------------------------------------------------------------------------------ main
def main(args):
    if args.threads < 1:
        raise SystemExit("error: --threads must be >= 1")
    if args.feature_dim < 1:
        raise SystemExit("error: --feature_dim must be >= 1")
    if args.workers < 0:
        raise SystemExit("error: --workers must be >= 0")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise SystemExit(f"error: --sections: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(SECTIONS)}")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: not found")
    if args.smoke:  # tiny everything; the size flags are ignored
        args.backbone, args.text_backbone, args.feature_dim, args.image_size = "res_tiny", "char_tiny", 32, (64, 32)
        args.workers = min(args.workers, 1)
    if args.smoke:  # one other family each way, so the multi-family path runs too
        args.families, args.text_families = "mobile_tiny", "char_small"
    plan = make_plan(args)
    if args.big is not None:
        if args.big < 2:
            raise SystemExit("error: --big must be >= 2")
        plan["big"] = args.big
    if args.omp_wait_policy != "inherit":
        if "torch" in sys.modules or "faiss" in sys.modules:
            print("warning: --omp_wait_policy has no effect: torch/faiss were imported before bench/speed.py ran",
                  file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    import faiss
    import onnxruntime as ort
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    faiss.omp_set_num_threads(args.threads)
    teacher_label = "tiny (smoke config)" if args.smoke else "so400m"
    t_start = time.perf_counter()
    print(f"bench/speed.py, {plan['mode']} run: {time.strftime('%Y-%m-%d %H:%M:%S')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load_avg()} (1/5/15 min)")
    print(f"threads: torch {torch.get_num_threads()}, onnxruntime intra_op {args.threads} (search/engine.make_session, "
          f"inter_op 1, no spinning), faiss {args.threads}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp spins)')}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"transformers {transformers.__version__}, faiss {faiss.__version__}")
    if args.smoke:
        print("SMOKE configuration: tiny teacher, student, galleries and batches; the numbers mean nothing")

    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        students = prepare_students(args, tmp) if {"image", "text"} & set(sections) else None
        if students:
            info, smodel = students[0]["info"], students[0]["model"]
        else:
            info, smodel, _ = prepare_student(args, tmp)
        if smodel is not None:
            cfg = smodel.cfg
        else:  # an export folder: rebuild a same-sized model for the training step from model_info.json
            from model import default_model_cfg
            cfg = default_model_cfg({k: info.get(k) for k in ("backbone", "text_backbone", "feature_dim", "image_size",
                                                             "max_seq_length", "vocab_size", "embed_dim")},
                                    teacher_dim=info.get("feature_dim"))
        image_desc = (f"{info.get('backbone')} {'x'.join(map(str, info['image_size']))}" if info.get("_image_model")
                      else "none (text-only export)")
        print(f"student: image {image_desc}, text "
              f"{info.get('text_backbone')}, D={info['feature_dim']}, max_seq_length {info['max_seq_length']}")
        head = {}
        if "image" in sections:
            section(f"1. Image encoders: SigLIP {teacher_label} vision tower vs student (ms per image, median)")
            head["image"] = bench_image(args, plan, students, teacher_label)
        if "text" in sections:
            section(f"2. Text encoders: SigLIP {teacher_label} text tower vs student (ms per caption, median)")
            head["text"] = bench_text(args, plan, students, teacher_label)
        if "search" in sections:
            section("3. Search: query latency, index build, recall@10")
            bench_search(args, plan, info)
        if "eval" in sections:
            section("4. Evaluation time (metrics.py)")
            bench_eval(args, plan, int(info["feature_dim"]))
        if "train" in sections:
            section("5. Training throughput (main.py step) and data loading")
            if cfg.get("text_only") or not info.get("_image_model"):
                print("skipped: a text-only student")
            else:
                bench_train(args, plan, cfg, tmp)

    section("Headline")
    vs = "so400m" if not args.smoke else "tiny SigLIP (smoke: not meaningful)"
    who = "the recipe" if not args.checkpoint else "the checkpoint"
    if head.get("image"):
        r, r8 = head["image"][0]
        print(f"image encoder speed-up vs {vs} @ batch 1: {fmt_x(r)} (target >= {IMAGE_TARGET}x) "
              f"{'met' if r >= IMAGE_TARGET else 'NOT met'}")
        if r8 is not None:
            print(f"image encoder (int8) speed-up vs {vs} @ batch 1: {fmt_x(r8)} ({who}, int8 ONNX Runtime)")
    elif "image" in head:
        print(f"image encoder speed-up vs {vs} @ batch 1: n/a (text-only student)")
    if head.get("text"):
        t = head["text"][0]
        print(f"text encoder speed-up vs {vs} @ batch 1: {fmt_x(t['fp32'])} (target >= {TEXT_TARGET}x) "
              f"{'met' if t['fp32'] >= TEXT_TARGET else 'NOT met'} (L=64 on both sides)")
        if t["int8"] is not None:
            print(f"text encoder (int8) speed-up vs {vs} @ batch 1: {fmt_x(t['int8'])} (L=64 on both sides)")
            print(f"text model + table, int8: {t['mib_int8']:.2f} MiB (target <= {TEXT_MIB_TARGET:.0f} MiB) "
                  f"{'met' if t['mib_int8'] <= TEXT_MIB_TARGET else 'NOT met'}; fp32 {t['mib_fp32']:.2f} MiB")
        print(f"text encoder speed-up vs {vs} @ batch 1, typical {t['avg_chars']:.0f}-character query: "
              f"{fmt_x(t['query'])} (the student runs only the characters there are; SigLIP always 64 tokens)")
    print(f"total {time.perf_counter() - t_start:.0f}s; load average at the end {load_avg()}")


if __name__ == "__main__":
    main(argparse.ArgumentParser("bench/speed.py", parents=[get_args_parser()], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter).parse_args())
