r"""Enrol a gallery with an HF image-text teacher's image tower (SigLIP / SigLIP2 / mexma-siglip2 / CLIP).

    python search/enroll_by_siglip.py --teacher google/siglip2-base-patch16-224 \
        --image-dir xm_images --output-prefix collection/person_siglip2
    # then search it with a --text_only student distilled from that teacher (no teacher needed at query time):
    python search/api.py --image-root xm_images --image_feature collection/person_siglip2_features.npy \
        --text-model logs/<text_only run>/export/model_text.onnx --queries "a woman in a red coat"

Same flags, formats, boxes files, append/resume and checkpointing as enroll_by_onnx.py. The collection's model
record says kind "teacher" and space "teacher:<name>", which a teacher-space student text model matches.
Needs torch + transformers (teachers.py); everything else in search/ does not.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from search.enroll import EnrolError, get_args_parser as enrol_parser, main_common  # noqa: E402
from search.engine import l2_normalize, teacher_key  # noqa: E402


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("enroll_by_siglip", parents=[enrol_parser()], add_help=add_help,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None,
                   help="HF model id or local folder, e.g. google/siglip2-base-patch16-224, visheratin/mexma-siglip2")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16 (auto: fp32 on CPU)")
    p.add_argument("--trust_remote_code", action="store_true", help="needed by custom-code teachers (mexma-siglip2)")
    return p


class TeacherEnrolEncoder:
    def __init__(self, args):
        if not args.teacher:
            raise EnrolError("pass --teacher NAME_OR_PATH (an HF image-text model id or a local copy of one)")
        from teachers import load_teacher  # torch lives behind this import

        try:
            self.teacher = load_teacher(args.teacher, device=args.device, dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:  # teachers.TeacherLoadError is a ValueError
            raise EnrolError(f"--teacher {args.teacher}: {str(e).splitlines()[0][:300]}") from None
        if getattr(self.teacher, "kind", None) == "attributes":
            raise EnrolError("the attribute teacher has no image tower; enrol with an image-text teacher "
                             "(SigLIP / SigLIP2 / CLIP) or with enroll_by_onnx.py")
        self.dim = int(self.teacher.dim)
        name = getattr(self.teacher, "name", args.teacher)
        self.model_record = {"kind": "teacher", "signature": f"teacher:{teacher_key(name)}",
                             "space": f"teacher:{teacher_key(name)}", "dim": self.dim, "teacher": name,
                             "teacher_kind": getattr(self.teacher, "kind", None)}

    def prepare(self, img, bbox):
        return img.crop(tuple(bbox)) if bbox is not None else img  # the teacher's processor resizes

    def embed(self, payloads):
        return l2_normalize(self.teacher.embed_images(list(payloads)))


def main(args):
    return main_common(args, TeacherEnrolEncoder)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
