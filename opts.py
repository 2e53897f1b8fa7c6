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
    g.add_argument("--langs", default="en,zh", help="caption languages used for training (those present in the JSON)")
    g.add_argument("--compose_prob", type=float, default=0.3,
                   help="probability of replacing a training caption by one composed from the record's attributes "
                        "in random order and wording (fixes recall for queries worded unlike the dataset captions)")
    g.add_argument("--instances_per_id", type=int, default=4,
                   help="P x K batches: runs of up to K images of one identity (1 = uniform sampling); 4 against "
                        "1 took held-out R@1 from 9.9 to 15.5 after 400 steps (synthetic 1000 ids, res_tiny)")
    g.add_argument("--compose_zh_prob", type=float, default=0.5, help="share of composed captions written in Chinese")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers per process (default: 4, or the CPU count when lower)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="res_tiny",
                   help="image encoder: a name from backbone.list_backbones() or backbone.<module>.<Class> (res_tiny: "
                        "learns fastest from scratch of the small ones, see README 'Student models')")
    g.add_argument("--backbone_weights", default=None, help="local ImageNet state_dict for the tv_* backbones")
    g.add_argument("--text_backbone", default="char_small", help="text encoder size: char_tiny, char_small, char_base")
    g.add_argument("--feature_dim", type=int, default=512, help="student embedding size (forced to the teacher's with --text_only)")
    g.add_argument("--max_seq_length", type=int, default=128,
                   help="characters per caption, including the leading CLS (longer ones are cut; 64 would cut "
                        "84%% of the synthetic English captions, median 87 characters)")
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
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--grad_clip", type=float, default=5.0, help="0 disables")
    g.add_argument("--iters", type=int, default=20000)
    g.add_argument("--warmup", type=int, default=-1,
                   help="linear warm-up steps; -1 = min(500, iters // 10)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, none on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive non-finite losses (each one is skipped and counted)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    g.add_argument("--dist_backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="torchrun process group: auto = nccl on CUDA, gloo on CPU (gloo also runs several processes "
                        "on one GPU, which NCCL refuses)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output_dir", default="logs", help="runs go to <output_dir>/expModel-<backbone>-<H>x<W>-<dim>/<run>/")
    g.add_argument("--run_name", default=None, help="run folder name (default: the next free number; with --resume auto: the newest)")
    g.add_argument("--resume", default="", help="'auto' (continue from the run's last.pt if any) or a checkpoint path")
    g.add_argument("--log_every", type=int, default=20)
    g.add_argument("--save_every", type=int, default=1000)
    g.add_argument("--keep_checkpoints", type=int, default=5, help="numbered checkpoints kept (last.pt and best.pt always)")
    g.add_argument("--eval_every", type=int, default=1000, help="held-out R@1/EER every N steps (0: only at the end)")
    g.add_argument("--eval_max_images", type=int, default=2000, help="cap on held-out images for the periodic evaluation")
    g.add_argument("--eval_langs", default="en", help="caption languages of the periodic evaluation")
    add_loss_args(p)
    return p
