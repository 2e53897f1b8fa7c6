r"""Enrol a folder of gallery images with the exported student image model (model_image.onnx).

    # from the repo root
    python search/enroll_by_onnx.py --image-dir xm_images --output-prefix collection/person \
        --model_dir logs/expModel-mobile_small-224x112-512/0/export
    # the seed's way: inside search/ with the export's files beside you (or pass --model_dir)
    cd search; python enroll_by_onnx.py --image-dir xm_images --output-prefix collection/person
    # person boxes from a detector (simple {"img.jpg": [[x1,y1,x2,y2], ...]} or COCO detections)
    python search/enroll_by_onnx.py --image-dir frames --boxes frames_boxes.json --output-prefix collection/frames

Writes PREFIX_features.npy (float32 [N,D], unit rows) + PREFIX_metadata.json (search/collection.py), and for
large galleries PREFIX_index.faiss (search/index.py). Re-running on a grown folder embeds only the new
(image, box) entries; a killed run resumes from its last checkpoint (every --checkpoint_every batches).
The model is found by: --model_dir; else the folder of --image-model; else the current directory if it holds
model_info.json. A collection enrolled with another model is refused unless --rebuild.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402

from search.enroll import get_args_parser as enrol_parser, main_common  # noqa: E402
from search.engine import ImageEncoder, export_space, file_sha256, load_export, load_hub, resolve_model_dir  # noqa: E402,E501
from search.hubness import hub_scores  # noqa: E402


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("enroll_by_onnx", parents=[enrol_parser()], add_help=add_help,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", "--model-dir", dest="model_dir", default=None,
                   help="export folder (model_info.json, model_image.onnx)")
    p.add_argument("--image-model", "--image_model", dest="image_model", default=None,
                   help="path of model_image.onnx (its folder must hold model_info.json)")
    return p


class OnnxEnrolEncoder:
    def __init__(self, args):
        info = load_export(resolve_model_dir(args.model_dir, image_model=args.image_model))
        if args.image_model:
            info["_image_model"] = str(Path(args.image_model).resolve())
        self.enc = ImageEncoder(info, threads=args.threads)
        self.dim = self.enc.dim
        sha = file_sha256(info["_image_model"])
        prep = {"image_size": list(self.enc.image_size), "mean": list(self.enc.mean), "std": list(self.enc.std)}
        # each entry's hub score (search/hubness.py) is part of what the model wrote, so another bank is another
        # model: a collection enrolled without this bank is refused (--rebuild) instead of mixing hub scores
        self.hub = load_hub(info)
        bank = {"query_bank_sha256": self.hub["sha256"], "hub_k": self.hub["k"]} if self.hub else {}
        sig = hashlib.sha256(json.dumps({"sha": sha, **prep, **bank}, sort_keys=True).encode()).hexdigest()[:16]
        self.model_record = {
            "kind": "onnx", "signature": f"onnx:{sig}", "space": export_space(info), "dim": self.dim,
            "export_dir": info["_dir"], "image_model_sha256": sha, **prep,
            **{k: info.get(k) for k in ("teacher", "teacher_space", "backbone", "text_backbone", "charmap_version",
                                        "max_seq_length")}, **bank,
        }

    def prepare(self, img, bbox):
        return self.enc.preprocess(img, bbox)  # runs in the decoding threads

    def embed(self, payloads):
        import numpy as np

        return self.enc.encode_arrays(np.stack(payloads))

    def annotate(self, features, items):
        """Store each new entry's hub score in its item (both back ends keep the item)."""
        if self.hub is not None:
            for it, h in zip(items, hub_scores(features, self.hub["bank"], self.hub["k"]).tolist()):
                it["hub"] = round(h, 6)


def main(args):
    return main_common(args, OnnxEnrolEncoder)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
