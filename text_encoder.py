"""Tokenizer-free character Transformer text encoder.

Text -> rows of `input_embeddings` by search/charmap.py (the one definition of the mapping) -> this module.
The table lookup is kept OUT of the exported graph (NPU runtimes lack Embedding/Gather): export traces
`forward_embedded(x [B,L,E] float, mask [B,L] float)`, and search/ does the lookup in numpy.

    from search.charmap import encode_batch
    enc = create_text_encoder("char_small", out_dim=512)
    ids, mask = encode_batch(["a man in a red coat"], max_len=64)
    emb = enc(torch.from_numpy(ids), torch.from_numpy(mask))        # [1, 512], not normalised

Exported ops (torch 2.14, both exporters): MatMul, Gemm, Add, Mul, Sub, Div, Softmax, LayerNormalization, Relu,
Reshape, Transpose, Split, Slice, ReduceSum, Clip, plus shape plumbing for the dynamic B and L (Shape, Concat,
Unsqueeze; the TorchScript exporter also Gathers from shape vectors, never from an input). ReLU rather than
GELU: Gelu/Erf are missing on many NPUs.
Pooling is the masked mean over all real tokens (CLS included), not the CLS output: with only 2-6 layers
every character then has a direct path to the embedding, where a CLS readout would depend on attention
having gathered everything into one token (and the sentence-transformers teacher mean-pools too). `pool="attn"`
(`--text_pool attn`, not in the recipe) weighs the characters by a learnt score instead (softmax over the real
tokens, zero-initialised: it starts as the mean), with the same ops.
"""
import math

import torch
import torch.nn as nn

from search.charmap import DEFAULT_VOCAB_SIZE

TEXT_POOLS = ("mean", "attn")
LENGTH_GROUP = 16  # rows per length group in forward() (8-16 were equally fast on the 2-core CPU; 32 slower)
TEXT_BACKBONES = {}  # name -> factory(out_dim, max_seq_length, vocab_size, embed_dim, **kw) -> CharTextEncoder


def register_text_backbone(name):
    def deco(fn):
        if name in TEXT_BACKBONES:
            raise ValueError(f"text backbone {name!r} registered twice")
        TEXT_BACKBONES[name] = fn
        return fn
    return deco


def list_text_backbones():
    return sorted(TEXT_BACKBONES)


def create_text_encoder(name, out_dim, max_seq_length=128, vocab_size=DEFAULT_VOCAB_SIZE, embed_dim=256, **kw):
    if not isinstance(name, str) or name not in TEXT_BACKBONES:  # names come from checkpoints too
        raise ValueError(f"unknown text backbone {name!r:.80}; registered: {', '.join(list_text_backbones())}")
    return TEXT_BACKBONES[name](out_dim=out_dim, max_seq_length=max_seq_length, vocab_size=vocab_size,
                                embed_dim=embed_dim, **kw)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} not divisible by {heads} heads"
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias):  # x [B,L,C], bias [B,1,1,L] additive (0 or -1e4)
        B, L = x.shape[0], x.shape[1]
        # widths as stored Python ints (not read from x.shape): the trace keeps them constant (one Split)
        # and only B, L stay dynamic; 4-D reshapes/transposes only: some NPU compilers reject 5-D tensors
        q, k, v = (t.reshape(B, L, self.heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(self.dim, dim=-1))
        att = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, L, self.dim))


class Block(nn.Module):
    """Pre-norm Transformer block (stable to train without warm-up tricks at these depths)."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x, bias):
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class CharTextEncoder(nn.Module):
    def __init__(self, out_dim, width=256, depth=4, heads=4, mlp_ratio=4.0, max_seq_length=128,
                 vocab_size=DEFAULT_VOCAB_SIZE, embed_dim=256, pool="mean"):
        super().__init__()
        if pool not in TEXT_POOLS:  # from checkpoints too
            raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {pool!r:.40}")
        self.pool = pool
        self.max_seq_length, self.embed_dim, self.out_dim = max_seq_length, embed_dim, out_dim
        self.input_embeddings = nn.Embedding(vocab_size, embed_dim)  # taken out of the graph at export
        self.in_proj = nn.Linear(embed_dim, width) if embed_dim != width else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        # attn: a learnt score per token, softmax over the real tokens -> weighted mean; lets label/lead
        # characters drop out of the embedding (a mean gives every character the same say)
        self.pool_score = nn.Linear(width, 1) if pool == "attn" else None
        self._init_weights(depth)
        if self.pool_score is not None:  # zero: uniform weights, i.e. exactly the masked mean at the start
            nn.init.zeros_(self.pool_score.weight)
            nn.init.zeros_(self.pool_score.bias)

    def _init_weights(self, depth):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Characters carry all the information: their rows must dominate the (shared) position embeddings from
        # the start, or every caption encodes to nearly the same vector and contrastive training collapses
        # (seen: std 0.02 rows through a 0.02 in_proj gave cos 0.99 between any two captions at init).
        nn.init.normal_(self.input_embeddings.weight, std=1.0)
        if isinstance(self.in_proj, nn.Linear):
            nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for b in self.blocks:  # GPT-2: scale residual-branch outputs so the residual stream stays O(1)
            nn.init.normal_(b.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(b.mlp[2].weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, ids, mask):
        """ids int64 [B,L] (L <= max_seq_length), mask bool/float [B,L] -> [B, out_dim].

        Rows are encoded in groups of similar length, each cut to its longest text (rounded up to 8): batches
        are padded to max_seq_length while a typical query-like training text is a third of it, and the
        padding's attention rows, MLPs and their backward were most of the tower's time (CPU, batch 64, 192
        characters: forward + backward 340 -> 100 ms, bench/train_profile.py). Exact, not an approximation:
        pads get no attention weight and no pooling weight, so a row's output does not depend on how much
        padding follows it (tests/test_models.py compares values and gradients with the full-length forward).
        The traced export path is forward_embedded, which keeps the caller's length."""
        if ids.shape[1] > self.max_seq_length:
            raise ValueError(f"text length {ids.shape[1]} > max_seq_length {self.max_seq_length}")
        B = ids.shape[0]
        if B == 0 or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.forward_embedded(self.input_embeddings(ids), mask)
        lengths = mask.sum(dim=1).to(torch.int64)
        order = torch.argsort(lengths, stable=True)
        group = max(LENGTH_GROUP, -(-B // 8))  # at most 8 groups: large (GPU) batches stay large matmuls
        # one host sync for all group lengths (not one per group)
        group_lengths = lengths[order].split(group)
        ends = torch.stack([g.max() for g in group_lengths]).tolist()
        outs = []
        for rows, n in zip(order.split(group), ends):
            n = min(ids.shape[1], max(8, -(-int(n) // 8) * 8))  # a few distinct shapes (--compile), >= 1 token
            outs.append(self.forward_embedded(self.input_embeddings(ids[rows, :n]), mask[rows, :n]))
        return torch.cat(outs).index_select(0, torch.argsort(order))

    def forward_embedded(self, x, mask):
        """x float [B,L,E] (looked-up rows), mask [B,L] (1 = token, 0 = pad) -> [B, out_dim]; the export path."""
        mask = mask.to(x.dtype)
        h = self.in_proj(x) + self.pos_embed[:, : x.shape[1]]
        # additive attention bias from the float mask with Sub/Mul only (no boolean indexing / where):
        # -1e4 underflows exp() to exactly 0 in fp32 and still fits fp16, so pads get no attention
        bias = ((mask - 1.0) * 1e4)[:, None, None, :]
        for blk in self.blocks:
            h = blk(h, bias)
        h = self.norm(h)
        m = mask[:, :, None]
        if self.pool_score is not None:
            w = (self.pool_score(h) + (m - 1.0) * 1e4).softmax(dim=1)  # pads: weight exactly 0
            pooled = (h * w).sum(dim=1)
        else:
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # masked mean; pads contribute nothing
        return self.proj(pooled)

    def no_weight_decay(self):
        return {"pos_embed"}


def _char(width, depth, heads):
    def factory(out_dim, **kw):
        return CharTextEncoder(out_dim, width=width, depth=depth, heads=heads, **kw)
    return factory


register_text_backbone("char_tiny")(_char(128, 2, 4))
register_text_backbone("char_small")(_char(256, 4, 4))
register_text_backbone("char_base")(_char(384, 6, 6))
