"""T5 v1.1 surgery: an expert routing block after every sub-layer output, frozen backbone.

methods.md section 2: a block sits on the output of every sub-layer, before its dropout and residual
add: encoder self-attention and feed-forward, decoder self-attention, cross-attention and feed-forward
(12 + 12 layers of T5 v1.1 base: 12*2 + 12*3 = 60 blocks). Encoder blocks route on the masked mean of
their own input; decoder blocks route on the masked mean of the encoder output, computed once per
example by a hook on the encoder and reused at every decoding step (also in ``generate``).
Trained: the routing blocks and every T5 LayerNorm weight. The transformers model is wrapped, not
copied: each sub-layer module (``SelfAttention``, ``EncDecAttention``, ``DenseReluDense``) is
replaced by a :class:`RoutedSublayer` holding the original.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5LayerCrossAttention, T5LayerFF, T5LayerNorm, T5LayerSelfAttention

from smear.configs import ConfigError
from smear.routing import ExpertRoutingBlock, RoutingConfig, RoutingContext, check_causal
from smear.routing.block import masked_mean

PAPER_MODEL = "google/t5-v1_1-base"
# T5 v1.1 shapes (the published configs of google/t5-v1_1-*), so that a declared hub model can be measured
# offline with random weights of its architecture
T5_V1_1 = {
    "google/t5-v1_1-small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64, vocab_size=32128),
    "google/t5-v1_1-base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128),
    "google/t5-v1_1-large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, d_kv=64, vocab_size=32128),
}


class RoutedSublayer(nn.Module):
    """A T5 sub-layer module followed by a routing block on its output (before dropout and residual)."""

    def __init__(self, inner: nn.Module, routing: ExpertRoutingBlock):
        super().__init__()
        self.inner, self.routing = inner, routing

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):  # T5Attention: (attention output, position bias, weights)
            return (self.routing(out[0]), *out[1:])
        return self.routing(out)


def tiny_t5_config(vocab_size: int = 384, **overrides) -> T5Config:
    """A small T5 v1.1-shaped config (gated GELU, untied head) for offline CPU runs; 384 = ByT5's vocabulary."""
    base = dict(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base.update(overrides)
    return T5Config(**base)


def load_t5(source: str, tiny: dict | None = None) -> T5ForConditionalGeneration:
    """``tiny`` (random weights from :func:`tiny_t5_config`, offline) or a model name/path (e.g. the paper's)."""
    if source == "tiny":
        # the frozen random backbone is the same for every trial, drawn from its own RNG: the caller's
        # (seeded) RNG stream is left untouched, so the trial's seed alone drives what is trained
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return T5ForConditionalGeneration(tiny_t5_config(**(tiny or {})))
    return T5ForConditionalGeneration.from_pretrained(source)


MODEL_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def pretrained_config(source: str, what: str = "model") -> dict | None:
    """Where ``from_pretrained(source)`` would find its files on this machine (a local folder, or the Hugging
    Face cache), without a download: the model's config.json as a dict ({} for a tokenizer), or None when
    a needed file is missing. ``what``: "model" (config + weights) or "tokenizer"."""
    import json

    from smear.hub import hf_cached_file

    needs = (MODEL_FILES, WEIGHT_FILES) if what == "model" else (TOKENIZER_FILES,)
    folder = Path(source).expanduser()
    if folder.is_dir():
        found = [next((str(folder / f) for f in names if (folder / f).is_file()), None) for names in needs]
    else:
        found = [hf_cached_file(source, names) for names in needs]
    if None in found:
        return None
    return json.loads(Path(found[0]).read_text()) if what == "model" else {}


def check_pretrained(source: str, what: str = "model") -> dict:
    """The config of a named model (or {} for a tokenizer) whose files are local or downloadable; else a
    one-line ConfigError naming the cache and how to provide them."""
    from smear.hub import hf_hub_cache, hf_offline, url_reachable

    found = pretrained_config(source, what)
    if found is not None:
        return found
    key = "t5.model" if what == "model" else "t5.tokenizer"
    if Path(source).expanduser().is_dir():
        needs = "config.json and one of " + ", ".join(WEIGHT_FILES) if what == "model" else "one of " + ", ".join(TOKENIZER_FILES)
        raise ConfigError(f"{key}={source!r} is a folder without {needs}; valid: a folder from save_pretrained or "
                          "a Hugging Face download")
    url = f"https://huggingface.co/{source}/resolve/main/{(MODEL_FILES if what == 'model' else TOKENIZER_FILES)[0]}"
    if hf_offline() or not url_reachable(url):
        tiny = "'tiny'" if what == "model" else "'byt5'"
        raise ConfigError(f"{key}={source!r} is neither a local folder nor in the Hugging Face cache "
                          f"({hf_hub_cache()}), and huggingface.co cannot be reached; valid: {tiny}, a local folder "
                          f"with its files, or `huggingface-cli download {source}` on a machine with network "
                          "(HF_HOME points at the cache)")
    return {}


def inject_routing_blocks(model: T5ForConditionalGeneration, cfg: RoutingConfig, *, num_tasks: int,
                          context: RoutingContext) -> list[str]:
    """Wrap every sub-layer of ``model`` in place; return the routing blocks' labels, e.g.
    "encoder.0.1.DenseReluDense" (stack, block, layer, sub-layer), the keys of their routing metrics."""
    d = model.config.d_model
    wrapped = []
    for stack_name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        route_from: Literal["self", "encoder"] = "encoder" if stack_name == "decoder" else "self"
        for i, blk in enumerate(stack.block):
            for j, layer in enumerate(blk.layer):
                attr = {T5LayerSelfAttention: "SelfAttention", T5LayerCrossAttention: "EncDecAttention",
                        T5LayerFF: "DenseReluDense"}[type(layer)]
                routing = ExpertRoutingBlock(d, cfg, layout="sequence", num_tasks=num_tasks, context=context,
                                             route_from=route_from)
                setattr(layer, attr, RoutedSublayer(getattr(layer, attr), routing))
                routing.label = f"{stack_name}.{i}.{j}.{attr}"       # stack.block.layer.sub-layer
                wrapped.append(routing.label)
    n_enc, n_dec = model.config.num_layers, model.config.num_decoder_layers
    assert len(wrapped) == 2 * n_enc + 3 * n_dec, (len(wrapped), n_enc, n_dec)
    return wrapped


class RoutedT5(nn.Module):
    """T5ForConditionalGeneration with routing blocks; the routing context is set from the inputs."""

    def __init__(self, t5: T5ForConditionalGeneration, context: RoutingContext, router_pooling: str = "masked"):
        super().__init__()
        self.t5, self.context = t5, context
        self.router_pooling = router_pooling  # "all": the official mean over padding too (RoutingConfig)
        t5.encoder.register_forward_hook(self._summarise_encoder)

    def _summarise_encoder(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (b, s, c)
        mask = self.context.mask
        if mask is None or self.router_pooling == "all":
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = mask.bool()
        self.context.encoder_summary = masked_mean(hidden, mask)                      # (b, c)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits (b, t, vocab) for targets ``labels`` (b, t), -100 = padding."""
        self.context.mask = attention_mask
        decoder_input_ids = self.t5._shift_right(labels.masked_fill(labels == -100, self.t5.config.pad_token_id))
        mask = attention_mask
        if self.t5.config._attn_implementation == "sdpa":
            # From a 2D mask, transformers' SDPA path asks ``mask.all()`` (a host sync, twice per forward: encoder
            # and cross-attention) to skip an all-true mask. A prepared 4D mask (b, 1, 1, s), True = attend, is
            # used as it is: the same attention, bit for bit, with no sync. (The eager path never asks.)
            mask = attention_mask.bool()[:, None, None, :]
        return self.t5(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, *,
                 use_cache: bool = True) -> Tensor:
        """Greedy decoding with the decoder's key/value cache: each step runs the decoder on the new token only.
        The encoder, hence the decoder blocks' routing (on the encoder summary), is computed once, and a decoder
        block's expert mixture is per position, so the cache gives the same tokens as a full re-run
        (``use_cache=False``; tests/test_t5_surgery.py)."""
        self.context.mask = attention_mask
        return self.t5.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                num_beams=1, do_sample=False, use_cache=use_cache)


def build_routed_t5(cfg: RoutingConfig, *, num_tasks: int, source: str = "tiny", tiny: dict | None = None) -> RoutedT5:
    """Frozen T5 + routing blocks after every sub-layer; blocks and T5 LayerNorm weights trainable."""
    t5 = load_t5(source, tiny)
    for p in t5.parameters():
        p.requires_grad_(False)
    context = RoutingContext()
    inject_routing_blocks(t5, cfg, num_tasks=num_tasks, context=context)
    for m in t5.modules():
        if isinstance(m, T5LayerNorm):
            m.weight.requires_grad_(True)
    return RoutedT5(t5, context, router_pooling=cfg.router_pooling)


def check_decoder_support(cfg: RoutingConfig) -> None:
    """Refuse what cannot run in causal decoder blocks (the method's ``check_causal``: e.g. per-token routing
    would change across decoding steps)."""
    check_causal(cfg)


def architecture(model: str) -> dict[str, int] | None:
    """The architecture of a declared T5 (name or local path), for random weights of that shape; None = 'tiny'."""
    if model == "tiny":
        return None
    if model in T5_V1_1:
        return dict(T5_V1_1[model])
    try:
        c = T5Config.from_pretrained(model, local_files_only=True)
    except Exception:
        raise ConfigError(f"t5.model={model!r}: its shape is unknown offline (no local config); valid: "
                          f"{', '.join(T5_V1_1)}, 'tiny', or a local model folder") from None
    if c.num_decoder_layers != c.num_layers:
        raise ConfigError(f"t5.model={model!r} has {c.num_layers} encoder and {c.num_decoder_layers} decoder layers; "
                          "the random stand-in needs equal counts")
    return dict(d_model=c.d_model, d_ff=c.d_ff, num_layers=c.num_layers, num_heads=c.num_heads, d_kv=c.d_kv,
                vocab_size=c.vocab_size)
