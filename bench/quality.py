"""Quality of the distilled student against its teacher, on held-out identities, in ONE command (README "Results").

    python bench/quality.py                       # full: 1000 + 4000 training-only ids, 5000 iterations (README)
    python bench/quality.py --quick               # ~10 min of training on 2 CPU cores: same data, 1100 iterations
    python bench/quality.py --smoke --out /tmp/q  # ~half a minute: tiny everything (tests/test_quality_bench.py)
    python bench/quality.py --ablation            # --quick size, one term off at a time, scored on validation ids
    python bench/quality.py --quick -- --compose_prob 0.5 --lr 3e-3    # extra main.py flags after --

Steps (each prints the exact command it runs; re-running reuses what is done):
1. data: tools/make_synthetic_pedes.py --ids N --extra_train_ids M --images_per_id 4 --seed S into
   OUT/data-<N>ids+<M>train-s<S> (kept when its bench_args.json matches), then the offline attribute teacher's
   cache (tools/extract_label.py --teacher attributes, which itself reuses/resumes) into OUT/emb-<same tag>.
   The test and validation identities are hashed among the first N ids only (the M are marked split "train").
2. teacher: EER, FRR@FAR=1e-3, R@1, R@5, mAP on the held-out identities (data.split_records, identity-disjoint)
   from the cache rows alone -- evaluation_labels.select_rows + metrics.evaluate_embeddings, as
   evaluation_labels.py computes them. The attribute teacher is privileged: its "image" row is the text of the
   ground-truth attributes, so its figures are an upper bound the student's pixels cannot reach.
3. student: main.py with RECIPE (+ --iters) into OUT/logs, evaluated from its best.pt (best validation R@1) with
   evaluation_model.embed_split + metrics (English captions against the student's own image embeddings).
4. text-only student: the same flags + TEXT_ONLY (--text_only --d_pos_weight 0); its captions against the
   teacher's image cache rows of the held-out records (a teacher-enrolled gallery), and the mean cosine of its
   caption embeddings to the teacher's.
5. paraphrases: text->image R@1 on the held-out records for (a) the dataset's English captions, (b) captions
   freshly composed by captions.compose_caption(attributes, random.Random(<a seed training never uses>), "en")
   -- new field order and wording, (c) the dataset's Chinese captions, (d) the Chinese renderings of (b).
   The teacher embeds every query text itself (teachers.load_teacher(...).embed_texts); all-MiniLM-L6-v2 is
   English-only, so its Chinese rows show how poorly it embeds Chinese (the cache stores zh caption rows through
   their English pivot instead, which is what the students distil from).
Runs are named by a hash of their flags, the dataset and the training code (TRAINING_SOURCES) and started with
--resume auto, so a killed bench continues and a finished run is reused; a changed RECIPE/size/extra flag or an
edit of model.py, losses.py, ... gives a new run. Figures go to OUT/quality.json
(atomically; --ablation: OUT/ablation.json). OUT defaults to logs/quality (git-ignored).
"""
import argparse
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# ---------------------------------------------------------------------------------------------------------------
# The recipe: main.py flags of the student (tune here). --iters comes from the size below.
RECIPE = {
    "backbone": "res_tiny", "text_backbone": "char_tiny", "image_size": "192x96", "feature_dim": 256,
    "max_seq_length": 192, "batch_size": 64, "instances_per_id": 4, "lr": 2e-3, "warmup": 50,
    "workers": 2, "log_every": 100, "eval_every": 500, "save_every": 500,  # bookkeeping, not quality
}
BOOKKEEPING = ("workers", "log_every", "eval_every", "save_every")  # left out of the run's hash: reuse stays valid
TEXT_ONLY = {"text_only": True, "d_pos_weight": 0}  # added to RECIPE for the text-only student
# --smoke shrinks the recipe so the whole bench runs in well under a minute (its figures mean nothing)
SMOKE_RECIPE = {"image_size": "64x32", "feature_dim": 32, "batch_size": 8, "warmup": 2, "workers": 0,
                "log_every": 5, "vocab_size": 1024, "embed_dim": 64}
# ids: identities whose test/validation ids are chosen by hash (data.split_records) -- the held-out test table;
# extra_train_ids: more identities after those, all marked split "train" (make_synthetic_pedes --extra_train_ids),
# so the student sees more people while the test identities and images stay exactly those of the `ids` alone.
SIZES = {  # ids, images per id, generated image height x width, training iterations
    "full": dict(ids=1000, extra_train_ids=4000, images_per_id=4, height=256, width=128, iters=5000),
    "quick": dict(ids=1000, extra_train_ids=4000, images_per_id=4, height=256, width=128, iters=1100),  # = full's data
    "smoke": dict(ids=24, extra_train_ids=8, images_per_id=2, height=128, width=64, iters=6),
}
# --ablation: each entry switches one loss term (group) off; the baseline is RECIPE itself
ABLATIONS = {
    "dist_rel": {"dist_rel_weight": 0},
    "rkd (rkda+rkdd)": {"rkda_weight": 0, "rkdd_weight": 0},
    "fd": {"fd_weight": 0},
    "id (img, cap, img_cap)": {"id_img_weight": 0, "id_cap_weight": 0, "id_img_cap_weight": 0},
    "d_pos+s_neg": {"d_pos_weight": 0, "s_neg_weight": 0},
    "attr (attribute-word loss)": {"attr_weight": 0},
    # this recipe's additions, each undone alone
    "stripe pooling (--stripes 0)": {"stripes": 0},
    "query-style captions (--augment_prob 0)": {"augment_prob": 0},
    "text bf16 + channels-last (--amp none --channels_last 0)": {"amp": "none", "channels_last": "0"},
    # the recipe's other choices, each undone alone
    "fd centring (--fd_center 0)": {"fd_center": 0},
    "P x K batches (--instances_per_id 1)": {"instances_per_id": 1},
    "192 characters (--max_seq_length 128)": {"max_seq_length": 128},
    # options not in the recipe, each added alone
    "+ real filler words (--filler_words 8000)": {"filler_words": 8000},
    "+ keyword-list consistency (--consist_weight 1)": {"consist_weight": 1},
    "+ teacher targets for query texts (--text_teacher attributes)": {"text_teacher": "attributes"},
    "+ attention pooling of the text tower (--text_pool attn)": {"text_pool": "attn"},
    "+ meaningless words in training texts (--noise_word_prob 0.4)": {"noise_word_prob": 0.4},
}
# a run is reused only when these sources are unchanged (the student's code and its losses' defaults live here)
TRAINING_SOURCES = ("main.py", "opts.py", "model.py", "losses.py", "data.py", "captions.py", "text_encoder.py",
                    "embedding_cache.py", "search/charmap.py", "backbone/*.py")
GENERATOR_SOURCES = ("tools/make_synthetic_pedes.py", "captions.py")
TEACHERS = ("attributes", "hash")  # hash: the --smoke stand-in, see HashTeacher
PARAPHRASE_SEED = "bench/quality/paraphrase/{seed}"  # training composes with "<seed>:<epoch>:<item>" seeds
TEST_RATIO = 0.1
QUERY_SETS = ("en", "new-en", "zh", "new-zh")
QUERY_FORMS = ("keywords", "fragment", "fields", "reordered", "search", "keywords+noise", "keywords-zh", "search-zh")


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("student vs teacher quality on held-out identities", add_help=add_help)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the full data, 1100 iterations (~10 min on 2 CPU cores)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; checks the script runs end to end")
    p.add_argument("--ablation", action="store_true",
                   help="at the --quick size (or --smoke): the student with one loss term off at a time")
    p.add_argument("--out", default=str(ROOT / "logs" / "quality"), help="folder for data, cache, runs, quality.json")
    p.add_argument("--ids", type=int, default=None,
                   help="identities the test/validation ids are drawn from (default: by mode, 1000)")
    p.add_argument("--extra_train_ids", type=int, default=None,
                   help="more training-only identities after --ids (default: by mode, 4000); the test split is "
                        "the same whatever this is")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: by mode, full 5000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed and training seed")
    p.add_argument("--device", default="cpu", help="training and evaluation device (main.py --device)")
    p.add_argument("--teacher", choices=TEACHERS, default=None,
                   help="attributes: the offline attribute teacher (all-MiniLM-L6-v2) through tools/extract_label.py "
                        "(default); hash: a bag-of-words stand-in written in-process (default with --smoke: no "
                        "model load, so the smoke test stays fast)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# commands

COMMANDS = []  # every command run, in order, for the report


def flags(d):
    out = []
    for k, v in d.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not False and v is not None:
            out += [f"--{k}", str(v)]
    return out


def run_cmd(cmd):
    """Run one command, print it first; its output goes to our stdout (and stderr) as it comes."""
    line = shlex.join(cmd)
    COMMANDS.append(line)
    print(f"\n$ {line}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=str(ROOT))
    if r.returncode != 0:
        raise SystemExit(f"error: exit status {r.returncode} from: {line}")
    return time.time() - t0


def sources_hash(patterns):
    h = hashlib.sha1()
    for pat in patterns:
        for f in sorted(ROOT.glob(pat)):
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def atomic_json(path, obj):
    tmp = Path(f"{path}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


class HashTeacher:
    """--smoke stand-in for the attribute teacher, no model: a text is the normalised sum of one fixed random vector
    per lowercase word (crc32-seeded). Like the attribute teacher it embeds an image as its attribute text and is
    English-only (a Chinese clause without spaces is one unknown 'word')."""
    kind, name, dim, multilingual = "hash", "hash-bag-of-words", 64, False

    def embed_texts(self, texts):
        import re
        import zlib
        import numpy as np
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", str(t).lower()) or ["<empty>"]:
                out[i] += np.random.default_rng(zlib.crc32(w.encode())).standard_normal(self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def write_hash_cache(data_json, emb_dir):
    """The cache tools/extract_label.py would write for an English-only text teacher, filled by HashTeacher."""
    import numpy as np
    import data as data_lib
    from embedding_cache import EmbeddingCache
    from teachers import attribute_text
    records = data_lib.load_records(str(data_json))
    rows = data_lib.caption_rows(records)
    t = HashTeacher()
    manifest = {"teacher": t.name, "teacher_kind": t.kind, "logit_scale": None, "logit_bias": None,
                "dataset": str(data_json), "dataset_sha256": data_lib.dataset_hash(str(data_json)),
                "preprocessing": {"text": "bag of crc32-seeded word vectors (bench/quality.py --smoke)",
                                  "image": "ground-truth attributes as text"}, "multilingual": False}
    counts = {"image": len(records), "caption": len(rows), "attributes": len(records), "prompt_caption": 0}
    cache = EmbeddingCache.create(str(emb_dir), manifest, counts, t.dim)
    attr = t.embed_texts([attribute_text(r["attributes"] or "") for r in records])
    cache.write("image", np.arange(len(records)), attr)
    cache.write("attributes", np.arange(len(records)), attr)
    cache.write("caption", np.arange(len(rows)), t.embed_texts([r[3] for r in rows]))  # zh rows: English pivot


def generate(gen):
    """tools/make_synthetic_pedes.py with the flags in `gen` (out=folder, ...) unless that folder already holds data
    generated with the same flags by the same generator code -> the dataset JSON."""
    data_dir = Path(gen["out"])
    data_json = data_dir / "synthpedes-dataset.json"
    stamp_obj = dict(gen, code=sources_hash(GENERATOR_SOURCES))
    stamp = data_dir / "bench_args.json"
    if data_json.exists() and stamp.exists() and json.loads(stamp.read_text()) == stamp_obj:
        print(f"\n(reusing {data_json}: generated with the same arguments)")
    else:
        run_cmd([sys.executable, str(ROOT / "tools" / "make_synthetic_pedes.py"), *flags(gen)])
        atomic_json(stamp, stamp_obj)
    return data_json


def prepare_data(args, size, out):
    """Synthetic data (reused when generated with the same arguments) and the attribute teacher's cache."""
    extra = size.get("extra_train_ids", 0)
    tag = f"{size['ids']}ids{f'+{extra}train' if extra else ''}-s{args.seed}" + ("-smoke" if args.smoke else "")
    emb_tag = tag + ("" if args.teacher == "attributes" else f"-{args.teacher}")
    data_dir, emb_dir = out / f"data-{tag}", out / f"emb-{emb_tag}"
    gen = dict(out=str(data_dir), ids=size["ids"], images_per_id=size["images_per_id"], seed=args.seed,
               height=size["height"], width=size["width"])
    if extra:
        gen["extra_train_ids"] = extra
    data_json = generate(gen)
    py = sys.executable
    import shutil
    import data as data_lib
    from embedding_cache import read_manifest
    try:
        old = read_manifest(str(emb_dir))
    except ValueError:  # unreadable / old format: ours to rebuild
        old = {}
    if old is not None and old.get("dataset_sha256") != data_lib.dataset_hash(str(data_json)):
        print(f"\n(removing {emb_dir}: built for other data)")
        shutil.rmtree(emb_dir)
    if args.teacher == "hash":
        print(f"\n(teacher cache {emb_dir}: bag-of-words hash teacher, written in-process)")
        write_hash_cache(data_json, emb_dir)
    else:
        run_cmd([py, str(ROOT / "tools" / "extract_label.py"), "--data", str(data_json), "--embedding_path",
                 str(emb_dir), "--teacher", args.teacher, "--workers", "0"])
    return data_json, emb_dir


def train(args, out, data_json, emb_dir, recipe, iters, extra, tag, last=None):
    """main.py with these flags (`last` after the user's extra ones, so it wins), in a run folder named by a hash of
    the flags and the dataset; returns (last.pt, seconds); a finished run with the same hash is reused."""
    import torch
    import data as data_lib
    head = ["--data", str(data_json), "--embedding_path", str(emb_dir)]
    tail = ["--iters", str(iters), "--seed", str(args.seed), "--device", args.device, *extra, *flags(last or {})]
    train_flags = head + flags(recipe) + tail
    quality_flags = head + flags({k: v for k, v in recipe.items() if k not in BOOKKEEPING}) + tail
    key = json.dumps([quality_flags, data_lib.dataset_hash(str(data_json)), sources_hash(TRAINING_SOURCES)])
    run_name = f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    cmd = [sys.executable, str(ROOT / "main.py"), *train_flags, "--output_dir", str(out / "logs"),
           "--run_name", run_name, "--resume", "auto"]
    found = sorted((out / "logs").glob(f"*/{run_name}/last.pt"))
    if found:
        step = torch.load(found[0], map_location="cpu", weights_only=True)["step"]
        if int(step) >= iters:
            COMMANDS.append(shlex.join(cmd) + "   # already done: reused")
            print(f"\n(reusing {found[0]}: finished run with the same flags)\n$ {shlex.join(cmd)}")
            return found[0], 0.0
    secs = run_cmd(cmd)
    found = sorted((out / "logs").glob(f"*/{run_name}/last.pt"))
    if not found:
        raise SystemExit(f"error: main.py wrote no last.pt for run {run_name} under {out / 'logs'}")
    return found[0], secs


# ---------------------------------------------------------------------------------------------------------------
# evaluation (imports, no subprocess)

def query_sets(records, idx, seed):
    """{name: (texts, pids, named)} of the query sets over the held-out records; `named` is the set of attribute
    fields each query names (for the attribute-match R@1).
    en/zh: the dataset's captions. new-en/new-zh: as many composed captions per record as it has English ones;
    two generators with the same seed draw the same plans, so new-zh[k] is the Chinese rendering of new-en[k].
    The QUERY_FORMS rows: bench/query_forms.py (one query per held-out image), wordings no training code writes."""
    import captions
    import query_forms
    rng_en = random.Random(PARAPHRASE_SEED.format(seed=seed))
    rng_zh = random.Random(PARAPHRASE_SEED.format(seed=seed))
    sets = {k: ([], [], []) for k in QUERY_SETS}
    for r in idx:
        rec = records[r]
        a = rec["attributes"]
        for name, texts in (("en", rec["captions"]), ("zh", rec["captions_zh"])):
            sets[name][0].extend(texts)
            sets[name][1].extend([rec["id"]] * len(texts))
            sets[name][2].extend(captions.mentioned_fields(a, c) if a else set() for c in rec["captions"])
        if a:
            for _ in rec["captions"] or [None]:
                en = captions.compose_caption(a, rng_en, "en")
                sets["new-en"][0].append(en)
                sets["new-zh"][0].append(captions.compose_caption(a, rng_zh, "zh"))
                for k in ("new-en", "new-zh"):
                    sets[k][1].append(rec["id"])
                    sets[k][2].append(captions.mentioned_fields(a, en))
    with_attrs = [r for r in idx if records[r]["attributes"]]
    for form in QUERY_FORMS:
        texts, named = query_forms.make_queries([records[r]["attributes"] for r in with_attrs], seed, form)
        sets[form] = (texts, [records[r]["id"] for r in with_attrs], named)
    return sets


def r1(query_emb, query_pids, gallery_emb, gallery_pids):
    import metrics
    if len(query_pids) == 0:
        return None
    return metrics.retrieval(query_emb, query_pids, gallery_emb, gallery_pids, ks=(1,), normalize=True)["R@1"]


def attr_r1(query_emb, query_pids, named, gallery_emb, gallery_pids, gallery_attrs):
    """Attribute-match R@1 (%): the top image (ties: the lower gallery index) has every attribute the query
    names (gender by kind, the other fields by value). For queries that name everything it is the identity R@1
    plus the images of look-alike identities; for a fragment it is the only fair question."""
    import numpy as np
    if len(query_pids) == 0:
        return None
    q = np.asarray(query_emb, np.float32)
    g = np.asarray(gallery_emb, np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return attr_hits_r1(np.argmax(q @ g.T, axis=1), query_pids, named, gallery_pids, gallery_attrs)


def attr_hits_r1(top, query_pids, named, gallery_pids, gallery_attrs):
    """attr_r1 of given top gallery indices (one per query)."""
    import captions
    parsed = [captions.parse_attributes(a) for a in gallery_attrs]
    by_pid = {int(p): parsed[i] for i, p in enumerate(gallery_pids)}
    hits = 0
    for k, t in enumerate(top):
        want, got = by_pid[int(query_pids[k])], parsed[int(t)]
        ok = all((captions.gender_kind(want[f]) == captions.gender_kind(got[f])) if f == "gender"
                 else want[f] == got[f] for f in named[k])
        hits += ok
    return 100.0 * hits / len(top)


def score_sets(sets, embed, gallery_emb, gallery_pids, gallery_attrs):
    """{"paraphrase_r1": {set: identity R@1}, "attr_r1": {set: attribute-match R@1}} with embed(set name, texts)
    -> [n, D]."""
    import numpy as np
    out = {"paraphrase_r1": {}, "attr_r1": {}}
    for name, (texts, pids, named) in sets.items():
        q = embed(name, texts)
        pids = np.array(pids, np.int64)
        out["paraphrase_r1"][name] = r1(q, pids, gallery_emb, gallery_pids)
        out["attr_r1"][name] = attr_r1(q, pids, named, gallery_emb, gallery_pids, gallery_attrs)
    return out


def hub_sets(model, cfg, ckpt_path, sets, q_emb, img_emb, img_pids, gallery_attrs, weight=0.5, bank_records=3000,
             device="cpu"):
    """score_sets' figures with search/'s ranking, cosine - weight * hub (search/hubness.py), the query bank built
    as export_model.py builds it: from the training identities of the checkpoint's own --data."""
    import numpy as np
    from checkpoint import load_checkpoint
    from evaluation_model import training_query_bank
    from search import hubness as hub_lib
    targs = load_checkpoint(ckpt_path).get("args") or {}
    bank_json = targs.get("data")
    if not bank_json or not os.path.isfile(str(bank_json)):
        raise SystemExit(f"error: the hubness correction builds its query bank from {ckpt_path}'s training data, "
                         f"and {bank_json or 'its args name none'} is not there")
    bank, _ = training_query_bank(model, cfg, bank_json, targs, bank_records, device=device)
    img = np.asarray(img_emb, np.float32)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    hub = hub_lib.hub_scores(img, bank, hub_lib.default_k(len(bank)))
    pids = np.asarray(img_pids)
    out = {"paraphrase_r1": {}, "attr_r1": {}}
    for name, (_, qp, named) in sets.items():
        if not len(qp):
            out["paraphrase_r1"][name] = out["attr_r1"][name] = None
            continue
        q = np.asarray(q_emb[name], np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        top = (q @ img.T - weight * hub[None]).argmax(1)  # exact: the whole (small) gallery re-ranked
        out["paraphrase_r1"][name] = 100.0 * float(np.mean(pids[top] == np.asarray(qp)))
        out["attr_r1"][name] = attr_hits_r1(top, qp, named, pids, gallery_attrs)
    return out


def core_figures(res):
    h = res["headline"]
    return {"eer": h["eer"], "frr@1e-3": h.get("frr@1e-3"), "r1": h["r1"], "r5": h["r5"], "map": h["map"]}


def eval_teacher(records, test_idx, cache, sets, teacher):
    import numpy as np
    import evaluation_labels
    import metrics
    img_done, cap_done = cache.done("image"), cache.done("caption")
    sel = evaluation_labels.select_rows(records, test_idx, img_done, cap_done, ("en",))
    img = np.asarray(cache.array("image")[sel["img_rows"]], np.float32)
    cap = np.asarray(cache.array("caption")[sel["cap_rows"]], np.float32)
    res = metrics.evaluate_embeddings(img, cap, sel["cap_img_index"], sel["img_pids"], sel["cap_pids"],
                                      top_k=0, normalize=True)
    out = core_figures(res)
    out.update(n_images=len(sel["img_rows"]), n_captions=len(sel["cap_rows"]),
               n_identities=len(set(sel["img_pids"].tolist())))
    emb = {}

    def embed(name, texts):
        emb[name] = teacher.embed_texts(texts) if texts else np.zeros((0, img.shape[1]), np.float32)
        return emb[name]
    attrs = [records[r]["attributes"] for r in sel["img_rows"]]
    out.update(score_sets(sets, embed, img, sel["img_pids"], attrs))
    return out, emb


def load_student(path, device):
    from checkpoint import load_checkpoint
    from model import build_model
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["model_cfg"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # the model code changed under a finished run
        first = str(e).strip().splitlines()[0]
        raise SystemExit(f"error: {path} does not fit the current model code ({first}); delete "
                         f"{Path(path).parent} and re-run") from None
    return model.to(device).eval(), ckpt["model_cfg"], int(ckpt["step"])


def pick_best(last):
    """best.pt (the checkpoint with the best R@1 on the run's validation identities) when the run kept one."""
    best = Path(last).with_name("best.pt")
    return best if best.exists() else Path(last)


def write_plots(out, records, test_idx, cache, s_emb, ckpt):
    """det.png (teacher and student on the same held-out pairs), retrieval.png (the student), learning_curve.png
    (the student's validation R@1/EER from its train.log), also into the run's TensorBoard -> {name: path}."""
    import torch
    import plots
    from evaluation_model import retrieval_rows, save_plots, teacher_det_curve
    curves = {"teacher (attributes)": teacher_det_curve(cache, s_emb),
              "student": plots.det_curve(s_emb["img_emb"], s_emb["cap_emb"], s_emb["cap_img_index"],
                                         s_emb["img_pids"], s_emb["cap_pids"])}
    return save_plots(out, curves, retrieval_rows(s_emb, records), Path(ckpt).parent,
                      int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"]))


def eval_student(path, records, test_idx, sets, device):
    import numpy as np
    import data as data_lib
    import metrics
    from evaluation_model import embed_split, embed_texts
    model, cfg, step = load_student(path, device)
    ok, n_missing, n_corrupt = data_lib.check_images([records[i] for i in test_idx])
    if n_missing or n_corrupt:
        print(data_lib.format_skip_summary(n_missing, n_corrupt))
    idx = [test_idx[k] for k in ok]
    emb = embed_split(model, records, idx, cfg, device=device, langs=("en",), workers=0, progress=False)
    res = metrics.evaluate_embeddings(emb["img_emb"], emb["cap_emb"], emb["cap_img_index"], emb["img_pids"],
                                      emb["cap_pids"], top_k=0)
    out = core_figures(res)
    out.update(checkpoint=str(path), step=step, n_images=len(idx), n_captions=len(emb["cap_texts"]))
    attrs = [records[r]["attributes"] for r in idx]
    q_emb = {name: embed_texts(model, texts, cfg, device) for name, (texts, _, _) in sets.items()}
    out.update(score_sets(sets, lambda name, _: q_emb[name], emb["img_emb"], emb["img_pids"], attrs))
    out.update(unfiltered_forms(model, cfg, device, sets, emb["img_emb"], emb["img_pids"], attrs))
    # what search/ answers by default: the same queries ranked with the export's hubness correction
    out["hub"] = hub_sets(model, cfg, path, sets, q_emb, emb["img_emb"], emb["img_pids"], attrs, device=device)
    return out, emb


def unfiltered_forms(model, cfg, device, sets, gallery_emb, gallery_pids, attrs):
    """The query forms once more with every word kept (embed_texts(filter_queries=False)): what the student's
    word-list filter (search/query_words.py) buys. {"query_vocab_words": n, "unfiltered_r1": {form: R@1}}."""
    from evaluation_model import embed_texts
    forms = {k: v for k, v in sets.items() if k in QUERY_FORMS}
    res = score_sets(forms, lambda _, t: embed_texts(model, t, cfg, device, filter_queries=False), gallery_emb,
                     gallery_pids, attrs)
    return {"query_vocab_words": len(cfg.get("query_vocab") or ()), "unfiltered_r1": res["paraphrase_r1"]}


def eval_text_only(path, records, test_idx, cache, sets, teacher_emb, teacher_multilingual, device):
    """Captions by the student against the teacher's image rows (a teacher-enrolled gallery); mean cosine of its
    caption embeddings to the teacher's on each query set (zh: to the cache's zh rows / the teacher's embedding of
    the parallel English caption when the teacher is English-only, i.e. the target the student was trained on)."""
    import numpy as np
    import metrics
    from evaluation_model import embed_split, embed_texts
    model, cfg, step = load_student(path, device)
    done = cache.done("image")
    idx = [i for i in test_idx if done[i]]
    emb = embed_split(model, records, idx, cfg, device=device, langs=("en",), workers=0, progress=False)
    img = np.asarray(cache.array("image")[idx], np.float32)
    res = metrics.evaluate_embeddings(img, emb["cap_emb"], emb["cap_img_index"], emb["img_pids"], emb["cap_pids"],
                                      top_k=0, normalize=True)
    out = core_figures(res)
    out.update(checkpoint=str(path), step=step, n_images=len(idx), n_captions=len(emb["cap_texts"]))
    cap_all = cache.array("caption")

    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    # teacher targets per query set: the cache rows for the dataset captions, fresh embeddings for composed ones
    import data as data_lib
    zh_caps = data_lib.eval_captions(records, idx, langs=("zh",))
    targets = {"en": cap_all[emb["cap_rows"]], "new-en": teacher_emb["new-en"],
               "zh": cap_all[np.array([c[0] for c in zh_caps], np.int64)] if zh_caps else None,
               "new-zh": teacher_emb["new-zh"] if teacher_multilingual else teacher_emb["new-en"]}
    out["mean_cos_to_teacher"], qs = {}, {}

    def embed(name, texts):
        qs[name] = embed_texts(model, texts, cfg, device)
        return qs[name]
    attrs = [records[r]["attributes"] for r in idx]
    out.update(score_sets(sets, embed, img, emb["img_pids"], attrs))
    out.update(unfiltered_forms(model, cfg, device, sets, img, emb["img_pids"], attrs))
    for name in QUERY_SETS:
        t, q = targets[name], qs[name]
        ok = t is not None and len(q) and len(t) == len(q)
        out["mean_cos_to_teacher"][name] = float((unit(q) * unit(t)).sum(1).mean()) if ok else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# printing

def fmt(v, pct=True):
    if v is None:
        return "n/a"
    return f"{v:.2f}" if pct else f"{v:.3f}"


def print_table(header, rows, first=40, width=12, title=""):
    print(title.ljust(first) + "".join(h.rjust(width) for h in header))
    for name, *vals in rows:
        print(name.ljust(first) + "".join(str(v).rjust(width) for v in vals))


def quality_table(res, teacher_ml):
    t, s, x = res["teacher"], res["student"], res["text_only"]
    rows = [(label, fmt(t[k]), fmt(s[k]), fmt(x[k])) for label, k in
            (("EER (%)", "eer"), ("FRR@FAR=1e-3 (%)", "frr@1e-3"), ("R@1 (%)", "r1"), ("R@5 (%)", "r5"),
             ("mAP (%)", "map"))]
    star = "" if teacher_ml else "*"
    for name, label in (("en", "dataset en"), ("new-en", "new-en (composed)"), ("zh", "dataset zh"),
                        ("new-zh", "new-zh (composed)")):
        tv = fmt(t["paraphrase_r1"][name]) + (star if name in ("zh", "new-zh") else "")
        rows.append((f"paraphrase R@1 (%): {label}", tv, fmt(s["paraphrase_r1"][name]),
                     fmt(x["paraphrase_r1"][name])))
    for name in QUERY_FORMS:
        rows.append((f"query form R@1 (%): {name}", fmt(t["paraphrase_r1"][name]) + (star if "zh" in name else ""),
                     fmt(s["paraphrase_r1"][name]), fmt(x["paraphrase_r1"][name])))
    for name in QUERY_FORMS:  # the students with every query word kept (the teacher never filters)
        rows.append((f"  the same, words not filtered: {name}", "-",
                     fmt(s.get("unfiltered_r1", {}).get(name)), fmt(x.get("unfiltered_r1", {}).get(name))))
    for name in QUERY_SETS + QUERY_FORMS:
        rows.append((f"attribute-match R@1 (%): {name}", fmt(t["attr_r1"][name]) + (star if "zh" in name else ""),
                     fmt(s["attr_r1"][name]), fmt(x["attr_r1"][name])))
    hub = s.get("hub")
    if hub:  # search/'s default ranking (search/hubness.py): the student column only, the text-only has no hubs
        for name in QUERY_SETS + QUERY_FORMS:
            key = "attr_r1" if name == "fragment" else "paraphrase_r1"
            rows.append((f"search, hub-corrected R@1 (%): {name}" + (" (attr.)" if name == "fragment" else ""),
                         "-", fmt(hub[key][name]), "-"))
    for name in QUERY_SETS:
        rows.append((f"text-only: mean cos to teacher {name}", "-", "-", fmt(x["mean_cos_to_teacher"][name], False)))
    print_table(["teacher", "student", "text-only"], rows, first=44)


def print_notes(res, teacher_ml):
    t, s = res["teacher"], res["student"]
    print(f"held-out: {t['n_identities']} identities, {s['n_images']} images, {s['n_captions']} English captions "
          f"(data.split_records, test_ratio {TEST_RATIO}); retrieval = text->image, a hit is any image of the "
          f"query's identity.")
    who = ("the attribute teacher (all-MiniLM-L6-v2)" if res["config"]["teacher"] == "attributes" else
           "the --smoke bag-of-words hash teacher")
    print(f"teacher = {who} from its cache: its 'image' row is the ground-truth attribute text "
          "(privileged: an upper bound, not a vision model).")
    print("text-only = the --text_only student's captions against the teacher's image rows (a teacher-enrolled "
          "gallery).")
    if not teacher_ml:
        print("* the teacher is English-only: it embeds Chinese text poorly, so its zh rows are "
              "low by construction; its cache embeds zh captions through the parallel English caption, which is "
              "what the students learn Chinese from. mean cos zh/new-zh compare with that English target.")
    print("new-en/new-zh: captions.compose_caption(attributes, random.Random(" +
          repr(PARAPHRASE_SEED.format(seed=res["config"]["seed"])) + "), lang), a generator training never uses; "
          "new-zh[k] renders the same plan as new-en[k].")
    print(f"students' queries drop the words their training texts never used (search/query_words.py; word lists "
          f"of {s.get('query_vocab_words', 0)} / {res['text_only'].get('query_vocab_words', 0)} words, 0 = a "
          f"checkpoint without one: nothing dropped); 'words not filtered' rows keep every word.")
    print("query forms: bench/query_forms.py (keyword lists, 2-3 field fragments, labelled fields, feet-first "
          "sentences, search requests, keyword lists with words no training text has, Chinese keywords and "
          "requests), one per held-out image; no training code imports it. attribute-match R@1: the top image has every attribute the query names (a fragment fits "
          "several people, so identity R@1 under-counts it).")


# ---------------------------------------------------------------------------------------------------------------

def main(args, extra):
    t_start = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.teacher is None:
        args.teacher = "hash" if args.smoke else "attributes"
    mode = "smoke" if args.smoke else "quick" if (args.quick or args.ablation) else "full"
    size = dict(SIZES[mode])
    if args.ids is not None:
        size["ids"] = args.ids
    if args.extra_train_ids is not None:
        size["extra_train_ids"] = args.extra_train_ids
    if args.iters is not None:
        size["iters"] = args.iters
    if size["ids"] < 2 or size["iters"] < 1 or size["extra_train_ids"] < 0:
        raise SystemExit("error: --ids must be >= 2, --iters >= 1 and --extra_train_ids >= 0")
    recipe = {**RECIPE, **(SMOKE_RECIPE if args.smoke else {})}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"bench/quality.py: mode {mode}{' + ablation' if args.ablation else ''}, {size['ids']} ids "
          f"(+{size['extra_train_ids']} training-only) x "
          f"{size['images_per_id']} images, {size['iters']} iterations, seed {args.seed}, out {out}, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    if args.smoke:
        print("SMOKE configuration: tiny data and model, a few iterations -- the figures mean nothing")
    times = {}

    t0 = time.time()
    data_json, emb_dir = prepare_data(args, size, out)
    times["data+teacher cache"] = time.time() - t0

    import numpy as np
    import torch
    import data as data_lib
    from embedding_cache import EmbeddingCache
    records = data_lib.load_records(str(data_json))
    test_idx = data_lib.split_records(records, TEST_RATIO, "test")
    if not test_idx:
        raise SystemExit(f"error: no held-out identity among {size['ids']} ids; use a larger --ids")
    cache = EmbeddingCache.open(str(emb_dir), str(data_json))
    sets = query_sets(records, test_idx, args.seed)
    config = dict(mode=mode, ablation=args.ablation, **size, seed=args.seed, teacher=args.teacher, recipe=recipe,
                  text_only_recipe=TEXT_ONLY, extra_main_flags=extra, test_ratio=TEST_RATIO, data=str(data_json),
                  embedding_path=str(emb_dir), device=args.device, torch=torch.__version__,
                  load_average_start=list(load0))

    if args.ablation:
        return run_ablation(args, out, data_json, emb_dir, records, test_idx, sets, recipe, size, extra, config,
                            times, t_start)

    t0 = time.time()
    if args.teacher == "hash":
        teacher = HashTeacher()
    else:
        from teachers import load_teacher
        teacher = load_teacher(args.teacher, device="cpu")
    t_res, t_emb = eval_teacher(records, test_idx, cache, sets, teacher)
    times["teacher eval"] = time.time() - t0

    ckpt, times["student train"] = train(args, out, data_json, emb_dir, recipe, size["iters"], extra, "student")
    ckpt = pick_best(ckpt)
    t0 = time.time()
    s_res, s_emb = eval_student(ckpt, records, test_idx, sets, args.device)
    times["student eval"] = time.time() - t0
    s_res["plots"] = write_plots(out / "plots", records, test_idx, cache, s_emb, ckpt)

    ckpt_t, times["text-only train"] = train(args, out, data_json, emb_dir, recipe, size["iters"], extra,
                                             "text_only", last=TEXT_ONLY)
    ckpt_t = pick_best(ckpt_t)
    t0 = time.time()
    x_res = eval_text_only(ckpt_t, records, test_idx, cache, sets, t_emb, teacher.multilingual, args.device)
    times["text-only eval"] = time.time() - t0

    times["total"] = time.time() - t_start
    res = {"config": config, "teacher": t_res, "student": s_res, "text_only": x_res,
           "query_counts": {k: len(v[0]) for k, v in sets.items()},
           "teacher_multilingual": bool(teacher.multilingual), "commands": COMMANDS,
           "wall_time_s": {k: round(v, 1) for k, v in times.items()},
           "load_average_end": list(os.getloadavg())}
    res = _jsonable(res)
    atomic_json(out / "quality.json", res)

    print("\n== quality: teacher vs student on held-out identities (" + mode + ") ==")
    quality_table(res, teacher.multilingual)
    print_notes(res, teacher.multilingual)
    print_footer(out / "quality.json", times)
    return res


def run_ablation(args, out, data_json, emb_dir, records, test_idx, sets, recipe, size, extra, config, times,
                 t_start):
    """One run per row; every row is scored on the runs' *validation* identities, never the test ones: an ablation
    is how recipe choices get made, and those are made on validation (issue #11)."""
    import data as data_lib
    import opts
    val_ratio = float(recipe.get("val_ratio", opts.get_args_parser().get_default("val_ratio")))  # main.py's
    val_idx = data_lib.split_records(records, TEST_RATIO, "val", val_ratio)
    if not val_idx:
        raise SystemExit(f"error: no validation identity at val_ratio {val_ratio}; use a larger --ids")
    sets = query_sets(records, val_idx, args.seed)
    config = dict(config, ablation_split="val", val_ratio=val_ratio,
                  val_identities=len({records[i]["id"] for i in val_idx}))
    rows, figs = [], {}
    for name, off in [("(none: full recipe)", {})] + list(ABLATIONS.items()):
        if off.get("text_teacher") and args.teacher != "attributes":
            continue  # the hash teacher lives in this process only: main.py cannot load it
        ckpt, secs = train(args, out, data_json, emb_dir, recipe, size["iters"], extra,
                           "student" if not off else "ablate-" + "-".join(k.replace("_weight", "") for k in off),
                           last=off)
        times[f"train {name}"] = secs
        t0 = time.time()
        r, _ = eval_student(ckpt, records, val_idx, sets, args.device)
        times[f"eval {name}"] = time.time() - t0
        figs[name] = {"off": off, **r}
        rows.append((name, fmt(r["eer"]), fmt(r["r1"]), fmt(r["paraphrase_r1"]["new-en"]),
                     fmt(r["paraphrase_r1"]["zh"])))
    times["total"] = time.time() - t_start
    res = _jsonable({"config": config, "ablation": figs, "commands": COMMANDS,
                     "wall_time_s": {k: round(v, 1) for k, v in times.items()},
                     "load_average_end": list(os.getloadavg())})
    atomic_json(out / "ablation.json", res)
    print(f"\n== ablation: the student with one loss term off or one recipe choice undone ({config['mode']} size, "
          f"{size['iters']} iterations; scored on {config['val_identities']} validation identities) ==")
    print_table(["EER (%)", "R@1 (%)", "new-en R@1", "zh R@1"], rows, first=40, title="switched off / undone")
    print_footer(out / "ablation.json", times)
    return res


def print_footer(json_path, times):
    print("\ncommands:")
    for c in COMMANDS:
        print(f"  {c}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items() if k != "total") +
          f"; total {times['total']:.0f}s ({times['total'] / 60:.1f} min)")
    print(f"wrote {json_path}")


def _jsonable(obj):
    import metrics
    return metrics.to_jsonable(obj)


def split_argv(argv):
    """bench flags before `--`, main.py flags after it."""
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1:]
    return argv, []


if __name__ == "__main__":
    own, extra = split_argv(sys.argv[1:])
    parser = argparse.ArgumentParser("bench/quality.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    main(parser.parse_args(own), extra)
