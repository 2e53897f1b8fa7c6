r"""Web UI with an HF teacher's text tower (SigLIP / SigLIP2 / mexma-siglip2) as the query encoder.

    python search/app_siglip.py --teacher google/siglip2-base-patch16-224 --image-root xm_images \
        --image_feature collection/person_siglip2_features.npy --port 5005

For a gallery enrolled with search/enroll_by_siglip.py using the same teacher. Needs torch + transformers
(teachers.py). Same routes and safety rules as app_onnx.py (search/webui.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from search.api import get_data_args_parser  # noqa: E402
from search.app_onnx import get_server_args_parser  # noqa: E402
from search.collection import CollectionError  # noqa: E402
from search.engine import ExportError, TeacherTextEncoder  # noqa: E402
from search.webui import main_serve  # noqa: E402


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("app_siglip", parents=[get_data_args_parser(), get_server_args_parser()],
                                add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF model id or local folder (the one used for enrolment)")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust_remote_code", action="store_true", help="needed by custom-code teachers (mexma-siglip2)")
    return p


def main(args):
    try:
        try:
            enc = TeacherTextEncoder(args.teacher, args.device, args.dtype, args.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"--teacher {args.teacher}: {str(e).splitlines()[0][:300]}") from None
        main_serve(args, enc, "Person search (teacher)")
    except (CollectionError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
