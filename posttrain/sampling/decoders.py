"""Incremental decoders: prompt logits, then one token at a time, over a KV cache.

Both decoders answer the same three calls for the sampler:

  start(B, S)                              allocate the cache for B rows of S columns;
  select_rows(index [B'])                  keep (or repeat) cache rows: row i becomes old row index[i];
  forward(ids [B,T], positions [B,T], start, key_mask [B,S]) -> logits [B,V] float32
                                           of each row's last position, after writing the
                                           T new keys/values at columns start … start+T−1.

key_mask [B, S] bool says which cache columns hold real tokens (True counts); a query sees
the real keys at or before its own column. Left padding therefore never reaches a real token,
and each row is computed as it would be alone.

`LlamaDecoder` is the fast path for Llama-architecture models (SmolLM2 among them): decode on a
CPU is bound by reading the weights once per step, so it keeps its own inference copy of them in
the sampling dtype (bf16: half the bytes, and no per-step re-casting as autocast would do), with
q/k/v and gate/up fused into one matrix each and a preallocated cache written in place.
LoRA adapters are merged into that copy. `sync()` refreshes it after the trained weights change.
On a CPU with oneDNN the matrices are also pre-packed into oneDNN's blocked layout once per
sync (what torch.compile's CPU freezing pass does): the matmuls of a decode step are tiny
(B rows), and re-laying the weight out on every call cost up to half their time here.
`HFDecoder` runs any other causal LM through its own forward and cache.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from transformers import DynamicCache, PreTrainedModel

from posttrain.models.logprobs import base_causal_lm

FAST_ARCHITECTURES = ("llama",)
"""config.model_type values LlamaDecoder computes exactly (RMSNorm, RoPE, GQA, SwiGLU)."""


def attention_mask(key_mask: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """[B, 1, T, S] bool: query t (cache column start+t) sees real keys at columns ≤ its own.

    Every query also sees its own column, so a padding query (whose earlier keys are all
    padding) gets a finite, unused output instead of a NaN that would enter the cache.
    """
    end = start + width
    keys = torch.arange(end, device=key_mask.device)
    queries = start + torch.arange(width, device=key_mask.device)
    causal = keys[None, :] <= queries[:, None]
    own = keys[None, :] == queries[:, None]
    return ((key_mask[:, None, :end] & causal[None]) | own[None])[:, None]


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    """The effective weight [out, in] of a linear layer, LoRA deltas of active adapters merged."""
    if isinstance(linear, LoraLayer):
        weight = linear.get_base_layer().weight
        if linear.disable_adapters or linear.merged:
            return weight
        return weight + sum(linear.get_delta_weight(name) for name in linear.active_adapters if name in linear.lora_A)
    if linear.bias is not None:
        raise ValueError(f"{type(linear).__name__} has a bias; the fast decoder supports bias-free Llama layers")
    return linear.weight


def attention_bias(key_mask: torch.Tensor, start: int, width: int, kv_heads: int, groups: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """`attention_mask` as an additive bias [B·K, G·T, S] (0 seen, −inf hidden), laid out for
    `grouped_attention` once per forward and shared by every layer."""
    mask = attention_mask(key_mask, start, width)                                # [B, 1, T, S]
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    batch, _, _, end = mask.shape
    return bias[:, :, None].expand(batch, kv_heads, groups, width, end).reshape(batch * kv_heads, groups * width, end)


def grouped_attention(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D + bias)·v for grouped-query attention: q [B, N, T, D], keys_t
    [B, K, D, S] (keys transposed), values [B, K, S, D] (each of the K heads serves G = N/K
    query heads), bias [B·K, G·T, S] from `attention_bias`. Returns [B, T, N·D].

    Two batched matmuls over B·K with the G query heads stacked, as transformers' eager
    attention computes it (scores in the compute dtype, softmax in fp32): for one query token
    this is several times faster on a CPU than torch's fused attention kernel, and it never
    repeats k/v. Keys are cached transposed because a slice [:S] of that layout multiplies
    without a copy (bf16 here: 0.14 ms instead of 0.35 ms a layer at B=32, S=180).
    """
    batch, heads, width, dim = q.shape
    kv = keys_t.shape[1]
    q = q.reshape(batch * kv, heads // kv * width, dim)                            # [B·K, G·T, D]
    scores = torch.baddbmm(bias, q, keys_t.flatten(0, 1), alpha=dim ** -0.5)       # [B·K, G·T, S]
    weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(weights, values.flatten(0, 1)).view(batch, heads, width, dim)  # [B, N, T, D]
    return out.transpose(1, 2).reshape(batch, width, heads * dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder:
    """Decode with an inference copy of a Llama model's weights (shapes: H hidden, D head dim,
    N query heads, K key/value heads, I MLP width, L layers, V vocabulary)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, batch_hint: int = 8):
        self.model = model
        self.lm = base_causal_lm(model)
        cfg = self.lm.config
        if cfg.model_type not in FAST_ARCHITECTURES or cfg.attention_bias or cfg.mlp_bias:
            raise ValueError(f"model_type {cfg.model_type!r}: LlamaDecoder needs a bias-free Llama model")
        self.dtype = dtype
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = self.lm.model.rotary_emb
        self.cache: list[torch.Tensor] = []
        self.batch_hint = batch_hint
        self.packed = self.lm.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.sync()

    def _matrix(self, *weights: torch.Tensor) -> torch.Tensor:
        """Weights [out_i, in] stacked along out, in the inference dtype, pre-packed for oneDNN
        where available. Each is cast as it is copied into the stack: stacking the fp32 weights
        first, then casting, took a fifth of a sync (SmolLM2, 2 threads)."""
        stacked = torch.empty((sum(w.shape[0] for w in weights), weights[0].shape[1]), dtype=self.dtype,
                              device=weights[0].device)
        row = 0
        for weight in weights:
            stacked[row: row + weight.shape[0]].copy_(weight.detach())
            row += weight.shape[0]
        return torch.ops.mkldnn._reorder_linear_weight(stacked, self.batch_hint) if self.packed else stacked

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return F.linear(x, weight)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the model's current weights (LoRA merged) into the inference copy."""
        cast = lambda t: t.detach().to(self.dtype, copy=True).contiguous()  # noqa: E731
        # The old copy goes first, so the new one can take its memory instead of adding to the
        # peak (five SmolLM2 syncs raised the peak RSS by 162 MB before, 4 MB after).
        self.embed = self.lm_head = self.final_norm = None
        self.layers = []
        embed, head = self.lm.model.embed_tokens.weight, _weight(self.lm.get_output_embeddings())
        self.embed = cast(embed)                                                           # [V, H]
        # A head tied to the embedding is packed from the embedding's inference copy (no second cast).
        self.lm_head = self._matrix(self.embed if head is embed else head)                 # [V, H]
        self.final_norm = cast(self.lm.model.norm.weight)
        for layer in self.lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "attn_norm": cast(layer.input_layernorm.weight),                            # [H]
                "qkv": self._matrix(_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)),  # [(N+2K)·D, H]
                "o": self._matrix(_weight(attn.o_proj)),                                  # [H, N·D]
                "mlp_norm": cast(layer.post_attention_layernorm.weight),
                "gate_up": self._matrix(_weight(mlp.gate_proj), _weight(mlp.up_proj)),     # [2I, H]
                "down": self._matrix(_weight(mlp.down_proj)),                             # [H, I]
            })

    def start(self, batch: int, width: int) -> None:
        """Allocate keys [B, K, D, S] (transposed, see grouped_attention) and values [B, K, S, D]
        for every layer."""
        keys, values = (batch, self.kv_heads, self.head_dim, width), (batch, self.kv_heads, width, self.head_dim)
        self.cache = [(self.embed.new_empty(keys), self.embed.new_empty(values)) for _ in self.layers]

    def select_rows(self, index: torch.Tensor) -> None:
        index = index.to(self.embed.device)
        self.cache = [(keys[index], values[index]) for keys, values in self.cache]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, self.eps)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, key_mask: torch.Tensor) -> torch.Tensor:
        device = self.embed.device
        ids, positions, key_mask = ids.to(device), positions.to(device), key_mask.to(device)
        batch, width = ids.shape
        end = start + width
        n, k, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)                                                   # [B, T, H]
        cos, sin = self.rotary(x, positions)                                               # [B, T, D]
        cos, sin = cos[:, None], sin[:, None]
        bias = attention_bias(key_mask, start, width, k, n // k, self.dtype)
        for layer, (keys, values) in zip(self.layers, self.cache):
            qkv = self._linear(self._norm(x, layer["attn_norm"]), layer["qkv"])                # [B, T, (N+2K)·D]
            qk = qkv[..., : (n + k) * d].view(batch, width, n + k, d).transpose(1, 2)      # [B, N+K, T, D]
            qk = qk * cos + _rotate_half(qk) * sin
            keys[:, :, :, start:end] = qk[:, n:].transpose(-1, -2)
            values[:, :, start:end] = qkv[..., (n + k) * d:].view(batch, width, k, d).transpose(1, 2)
            attn = grouped_attention(qk[:, :n], keys[:, :, :, :end], values[:, :, :end], bias)  # [B, T, N·D]
            x = x + self._linear(attn, layer["o"])
            gate, up = self._linear(self._norm(x, layer["mlp_norm"]), layer["gate_up"]).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, layer["down"])
        return self._linear(self._norm(x[:, -1], self.final_norm), self.lm_head).float().cpu()


class HFDecoder:
    """Decode with the model's own forward and a transformers DynamicCache (any causal LM),
    under autocast to the sampling dtype; no copy of the weights, so sync() does nothing."""

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.cache = None

    def sync(self) -> None:
        pass

    def start(self, batch: int, width: int) -> None:
        self.cache = DynamicCache()

    def select_rows(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index.to(next(self.model.parameters()).device))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, key_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        context = (torch.autocast(device_type=device.type, dtype=self.dtype) if self.dtype != torch.float32
                   else nullcontext())
        training = self.model.training
        self.model.eval()  # no dropout while sampling
        with context:
            out = self.model(input_ids=ids.to(device), position_ids=positions.to(device),
                             attention_mask=key_mask[:, : start + ids.shape[1]].long().to(device),
                             cache=self.cache, use_cache=True, logits_to_keep=1)
        self.model.train(training)
        self.cache = out.cache
        return out.logits[:, -1].float().cpu()


DECODERS = {"llama": LlamaDecoder, "hf": HFDecoder}
"""Sampler backends by name; "auto" picks llama for FAST_ARCHITECTURES, hf otherwise."""


def make_decoder(model: torch.nn.Module, dtype: torch.dtype, backend: str = "auto", batch_hint: int = 8):
    """The decoder for `model`: `backend` one of DECODERS or "auto"; batch_hint is the usual
    number of rows (oneDNN picks its weight layout for it)."""
    if backend == "auto":
        backend = "llama" if base_causal_lm(model).config.model_type in FAST_ARCHITECTURES else "hf"
    if backend not in DECODERS:
        raise ValueError(f"sampler backend {backend!r} is not one of auto, {', '.join(DECODERS)}")
    return LlamaDecoder(model, dtype, batch_hint) if backend == "llama" else HFDecoder(model, dtype)
