"""Hubness correction of the text -> image ranking (CSLS / QB-Norm style), numpy only.

A query worded unlike the captions the student learnt from ("man, red shirt, blue jeans", "upper: red coat")
carries a near-constant offset that points at a few "hub" gallery images, which then come first for many such
queries whatever they name. Each gallery image gets a hub score when it is enrolled: the mean cosine of its
`k` nearest texts in a *query bank* (the student's embeddings of training-split texts in the forms the training
code writes; export_model.py writes it as query_bank.npy). Search ranks by

    cosine(query, image) - weight * hub(image)

which pushes down the images that are close to every query. The hub score depends on the image and the bank only
(not on the rest of the gallery), so it is computed once per image at enrolment, on any back end; search re-ranks
the index's top candidates (see CANDIDATES), and the score it reports stays the raw cosine (the EER/FAR
thresholds of evaluation_model.py are cosines).
"""
import numpy as np

QUERY_BANK_FILE = "query_bank.npy"
DEFAULT_WEIGHT = 0.5
TOP_FRACTION = 1 / 90  # k = rows / 90: 100 of the 9000 texts of a 3000-record bank (chosen on a validation gallery)


def default_k(rows):
    return max(1, int(round(rows * TOP_FRACTION)))


def candidates(top_n):
    """How many raw-cosine neighbours to re-rank for top_n results. On the validation gallery the corrected top-1
    was at most 15th by raw cosine (99% within the first 6)."""
    return top_n + max(3 * top_n, 50)


def load_query_bank(path, dim):
    """-> float32 [N, dim] unit rows. ValueError (one line) when the file is not such an array."""
    try:
        bank = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: unreadable query bank ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") \
            from None
    if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] != dim or bank.dtype.kind != "f":
        raise ValueError(f"{path}: expected a float array [N>=1, {dim}], got {bank.dtype} {list(bank.shape)}")
    bank = bank.astype(np.float32)
    if not np.isfinite(bank).all():
        raise ValueError(f"{path}: the query bank holds non-finite values")
    n = np.linalg.norm(bank, axis=1, keepdims=True)
    if (n < 1e-6).any():
        raise ValueError(f"{path}: the query bank holds zero rows")
    return bank / n


def hub_scores(features, bank, k):
    """features [B, D] (unit rows) -> float32 [B]: the mean of each row's k largest cosines to the bank."""
    f = np.asarray(features, np.float32)
    if len(f) == 0:
        return np.zeros(0, np.float32)
    k = max(1, min(int(k), len(bank)))
    out = np.empty(len(f), np.float32)
    for s in range(0, len(f), 256):  # [256, N] at a time: a 9000-text bank is 9 MB per chunk
        sims = f[s:s + 256] @ bank.T
        out[s:s + 256] = np.partition(sims, len(bank) - k, axis=1)[:, len(bank) - k:].mean(1)
    return out


def rerank(hits, weight, top_n):
    """hits: [(cosine, row, item)] best first -> the top_n by cosine - weight * item["hub"]. When any hit has no hub
    score (an entry enrolled without the bank) the raw order is kept: mixing corrected and raw scores would rank
    the uncorrected entries up."""
    if weight <= 0 or not hits or any(not isinstance(it.get("hub"), (int, float)) for _, _, it in hits):
        return hits[:top_n]
    order = sorted(range(len(hits)), key=lambda i: (-(hits[i][0] - weight * float(hits[i][2]["hub"])), i))
    return [hits[i] for i in order[:top_n]]
