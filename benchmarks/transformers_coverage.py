"""Which transformers language models fusedloss.integrations.transformers.apply computes
exactly: every causal-LM and conditional-generation class the installed transformers
exports, each built tiny from its own config class with random weights (no download),
checked on one batch.

    python -m benchmarks.transformers_coverage               # every class, the table
    python -m benchmarks.transformers_coverage LlamaForCausalLM Gemma3ForConditionalGeneration
    python -m benchmarks.transformers_coverage --output benchmarks/results/transformers_coverage.md

A class ends in one of four outcomes:
  supported  apply(model) patches it, and the loss and every parameter's gradient equal the
             unpatched model's (float32, dropout 0, labels with ignored positions, with and
             without num_items_in_batch)
  refused    apply(model), or its first labelled forward, raises UnsupportedModel: the
             reason is the one a user would read
  skipped    its tiny model could not be built from the config class automatically, or
             the unpatched tiny model does not compute a loss from the batch (text only,
             plus images where the class requires them): nothing is known of it
  failed     anything else: another exception, or a loss or gradient that differs (a bug)

The tiny config: the config class's defaults with every size found by its usual name
shrunk (2 layers, hidden 64, 2 heads of 32, vocabulary 128, ...), token ids kept inside
the vocabulary, dropout 0, a mixture of experts' router aux loss on. tests/test_transformers_integration.py runs the same check
for every class.
"""
import argparse
import dataclasses
import inspect
import sys
import time

import torch

VOCAB = 128
MAX_PARAMETERS = 50_000_000  # beyond, a model is skipped (its tiny config is not tiny)
BATCH, SEQ = 2, 8
SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Sizes by the names transformers' configs use for them: counts are capped, widths set.
LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers",
          "decoder_layers", "encoder_layers", "num_encoder_layers", "text_layers",
          "vision_layers", "num_local_layers", "num_global_layers")
WIDTHS = {"hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64,
          "intermediate_size": 64, "ffn_dim": 64, "d_ff": 64, "n_inner": 64,
          "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "moe_intermediate_size": 32,
          "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
          "head_dim": 32, "d_kv": 32, "attention_head_dim": 32, "kv_channels": 32,
          "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 16,
          "qk_nope_head_dim": 16, "v_head_dim": 32, "rotary_dim": 16,
          "vocab_size": VOCAB, "text_vocab_size": VOCAB}
COUNTS = {"num_attention_heads": 2, "n_head": 2, "num_heads": 2, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "num_experts": 4, "num_local_experts": 4,
          "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
          "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256,
          "first_k_dense_replace": 1, "mamba_n_heads": 4, "mamba_d_state": 16,
          "mamba_n_groups": 1, "n_groups": 1, "n_group": 1, "topk_group": 1,
          "num_filters": 4}
# Other widths, by the ends of their names (the vocabulary's by "vocab" in the name), but
# not image or patch sizes, windows and positions.
WIDE = ("_size", "_dim", "_channels", "_features", "hidden_dim", "_head_dim")
KEEP = ("image", "patch", "max_", "sliding", "window", "chunk", "sampling", "num_", "kernel",
        "conv", "spatial", "temporal", "merge", "pool", "mm_tokens", "position", "block",
        "codebook", "frame", "hop", "n_fft", "audio_length", "sample")
KV_HEADS = ("num_key_value_heads", "n_head_kv", "num_kv_heads")


def classes():
    """The causal-LM and conditional-generation classes the installed transformers exports."""
    import transformers
    return sorted(name for name in dir(transformers)
                  if name.endswith(SUFFIXES) and not name.startswith(("Auto", "TF", "Flax"))
                  and "PreTrainedModel" not in name)


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # supported, refused, skipped, failed
    reason: str = ""
    inputs: str = ""  # what the batch held: "text" or "text+images"
    seconds: float = 0.0


# ------------------------------------------------------------------------ tiny configs
def _shrink(d):
    """A config's to_dict(), shrunk in place (sub-configs too)."""
    old = dict(d)
    old_layers = d.get("num_hidden_layers")
    old_head = d.get("head_dim") or (
        d["hidden_size"] // d["num_attention_heads"]
        if isinstance(d.get("hidden_size"), int) and d.get("num_attention_heads") else None)
    heads, kv = d.get("num_attention_heads"), None
    for key in KV_HEADS:
        if isinstance(d.get(key), int) and isinstance(heads, int):
            kv = key
    for key, value in list(d.items()):
        if isinstance(value, dict) and "model_type" in value:
            _shrink(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or key == kv:
            continue
        elif isinstance(value, float):
            if "dropout" in key or "pdrop" in key or key.endswith(("drop_rate", "drop_prob")):
                d[key] = 0.0
        elif key in LAYERS or "layers" in key:
            d[key] = min(value, 2)
        elif key in WIDTHS and value > 0:
            d[key] = WIDTHS[key]
        elif key in COUNTS and value > 0:
            d[key] = min(value, COUNTS[key])
        elif "vocab" in key and value > VOCAB:
            d[key] = VOCAB
        elif key.endswith(WIDE) and not any(k in key for k in KEEP) and value > 64:
            d[key] = 64 if not key.endswith("head_dim") else 32
        elif key.endswith("_heads") and value > 2:
            d[key] = 2
    if "output_router_logits" in d:  # a mixture of experts: its aux loss on
        d["output_router_logits"] = True
    if isinstance(d.get("depths"), list):  # blocks per stage
        d["depths"] = [min(v, 1) for v in d["depths"]]
    if "head_dim" in d and d["head_dim"] is None and "num_attention_heads" in d:
        d["head_dim"] = WIDTHS["head_dim"]
    if old.get("head_dim") and old.get("head_dim") == old.get("qk_rope_head_dim"):
        d["head_dim"] = d["qk_rope_head_dim"]  # multi-head latent attention: the rope part
    for expand, n, width in (("mamba_expand", "mamba_n_heads", "mamba_d_head"),
                             ("expand", "num_heads", "head_dim")):
        if all(isinstance(d.get(k), int) for k in (expand, n, width, "hidden_size")):
            d[width] = d[expand] * d["hidden_size"] // d[n]  # a Mamba-2 mixer's heads
    if kv:  # grouped heads stay grouped, multi-head attention stays so
        d[kv] = d["num_attention_heads"] if d[kv] == heads else 1
    n = d.get("num_hidden_layers")
    if old_layers and n != old_layers:  # per-layer lists and patterns
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_layers:
                d[key] = value[:n - 1] + value[-1:]
            elif isinstance(value, dict) and value and all(
                    str(k).isdigit() for k in value):  # per-layer settings by index
                d[key] = {k: v for k, v in value.items() if int(k) < n}
            elif key.endswith(("_offset", "_period")) and isinstance(value, int):
                d[key] = min(value, n - 1 if key.endswith("_offset") else n)
            elif key.endswith(("layer_indices", "layers_block_type", "layer_ids")) and \
                    isinstance(value, list):
                d[key] = [i for i in value if isinstance(i, int) and i < n] or [n - 1]
    new_head = d.get("head_dim") or (d.get("hidden_size", 0) // (d.get("num_attention_heads") or 1))
    for value in d.values():  # multimodal rope sections split the head's rotary half
        if isinstance(value, dict) and isinstance(value.get("mrope_section"), list) and old_head:
            section = [max(1, s * new_head // old_head) for s in value["mrope_section"]]
            total = sum(value["mrope_section"]) * new_head // old_head
            section[0] += total - sum(section)
            value["mrope_section"] = section
    return d


def _token_ids(d, vocab, named):
    """Token ids of the config kept inside the vocabulary (those beyond it moved to its top
    16 ids); every id named is added to `named`."""
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:
            _token_ids(value, vocab, named)
        elif key.endswith(("token_id", "token_index", "token_ids")):
            values = value if isinstance(value, list) else [value]
            moved = []
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool):
                    if not 0 <= v < vocab - 16:
                        v = vocab - 1 - len(named) % 16
                    named.add(v)
                moved.append(v)
            d[key] = moved if isinstance(value, list) else moved[0]


def _configs(config):
    """config and its sub-configs."""
    yield config
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            yield from _configs(value)


def tiny_config(cls):
    """(config, the token ids it names) for a tiny random model of class `cls`."""
    config_class = cls.config_class
    d = _shrink(config_class().to_dict())
    named = set()
    _token_ids(d, VOCAB, named)
    config = config_class.from_dict(d)
    for sub in _configs(config):  # a multimodal rope whose sections the model defaults
        rope = getattr(sub, "rope_parameters", None)
        if isinstance(rope, dict) and "mrope_section" not in rope and "mrope_section" in \
                getattr(type(sub), "ignore_keys_at_rope_validation", ()):
            head = getattr(sub, "head_dim", None) or sub.hidden_size // sub.num_attention_heads
            partial = rope.get("partial_rotary_factor", getattr(sub, "partial_rotary_factor", 1))
            half = int(head * partial) // 2
            rope["mrope_section"] = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return config, named


def build(name):
    """(model, config, named token ids): class `name` of transformers, tiny, float32, random
    weights with logits well away from 0 (so that a softcap or a scale shows)."""
    import transformers
    cls = getattr(transformers, name)
    config, named = tiny_config(cls)
    try:  # its size first, on the meta device (a class may not build there: then built)
        with torch.device("meta"):
            size = sum(p.numel() for p in cls._from_config(config).parameters())
    except Exception:  # noqa: BLE001
        size = 0
    if size > MAX_PARAMETERS:
        raise ValueError(f"the automatic tiny config still has {size / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").float()
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        with torch.no_grad():
            head.weight.mul_(20)
    return model, config, named


# ------------------------------------------------------------------------ the batch
def _vision(config):
    for key in ("vision_config", "visual_config", "vision_tower_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            return sub
    return None


def batch(model, config, named):
    """input_ids, attention_mask and labels (ignored positions in both rows), and
    pixel_values where the forward requires them."""
    generator = torch.Generator().manual_seed(0)
    allowed = torch.tensor([i for i in range(VOCAB - 16) if i not in named])
    ids = allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=generator)]
    labels = ids.clone()
    labels[0, -3:] = -100
    labels[1, :2] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        inputs["use_cache"] = False
    if "decoder_input_ids" in params:  # an encoder-decoder: other tokens for its decoder
        inputs["decoder_input_ids"] = allowed[torch.randint(len(allowed), (BATCH, SEQ),
                                                            generator=generator)]
    required = [p for p, v in params.items() if v.default is inspect.Parameter.empty
                and v.kind is v.POSITIONAL_OR_KEYWORD and p not in inputs]
    vision = _vision(config)
    if "pixel_values" in required and vision is not None:
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        inputs["pixel_values"] = torch.randn(BATCH, getattr(vision, "num_channels", 3), size,
                                             size, generator=generator)
    return inputs


def _step(model, inputs):
    """Loss and {parameter name: gradient} of one forward and backward (dropout, if any,
    drawn from the same seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**inputs).loss
    if loss is None:
        return None, {}
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _differs(ours, theirs):
    """A description of how two (loss, gradients) differ, or "" if they agree."""
    (loss, grads), (expected, expected_grads) = ours, theirs
    if not torch.allclose(loss, expected, rtol=1e-5, atol=1e-6):
        return f"loss {loss.item():.7g} != {expected.item():.7g}"
    overall = max((e.abs().max().item() for e in expected_grads.values()), default=0.0)
    for name in sorted(set(grads) | set(expected_grads)):
        g, e = grads.get(name), expected_grads.get(name)
        if g is None or e is None:  # a missing gradient only where the other is all 0
            if (e if g is None else g).abs().max() > 0:
                return f"the gradient of {name} is missing from one run"
            continue
        scale = e.abs().max().item()
        if not torch.allclose(g, e, rtol=1e-4, atol=1e-4 * max(scale, 1e-2 * overall)):
            return f"the gradient of {name} differs by {(g - e).abs().max().item():.3g} " \
                   f"(max {scale:.3g})"
    return ""


def check(name):
    """The Outcome of class `name` (see the module docstring)."""
    import fusedloss.integrations.transformers as fl_hf
    start = time.perf_counter()
    outcome = lambda status, reason="": Outcome(  # noqa: E731
        name, status, reason, "text+images" if "pixel_values" in inputs else "text",
        time.perf_counter() - start)
    inputs = {}
    try:
        model, config, named = build(name)
        inputs = batch(model, config, named)
    except Exception as error:  # noqa: BLE001 (the reason is reported)
        return outcome("skipped", f"no tiny model: {_short(error)}")
    model.train()
    variants = [inputs, {**inputs, "num_items_in_batch": (inputs["labels"] != -100).sum() - 1}]
    try:
        try:
            expected = [_step(model, v) for v in variants]
        except Exception:  # noqa: BLE001
            routers = [c for c in _configs(model.config) if getattr(c, "output_router_logits", 0)]
            if not routers:
                raise
            for c in routers:  # a few models fail with their router logits on: then off
                c.output_router_logits = False
            expected = [_step(model, v) for v in variants]
    except Exception as error:  # noqa: BLE001
        return outcome("skipped", f"the unpatched tiny model does not run: {_short(error)}")
    if expected[0][0] is None or not torch.isfinite(expected[0][0]):
        return outcome("skipped", "the unpatched tiny model computes no finite loss")
    try:
        fl_hf.apply(model)
        for variant, theirs in zip(variants, expected):
            why = _differs(_step(model, variant), theirs)
            if why:
                return outcome("failed", why)
    except fl_hf.UnsupportedModel as error:
        if not str(error).startswith(f"{name}: "):
            return outcome("failed", f"a refusal that does not name the class: {error}")
        return outcome("refused", error.reason)
    except Exception as error:  # noqa: BLE001
        return outcome("failed", _short(error))
    return outcome("supported")


def _short(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


# ------------------------------------------------------------------------ the report
def table(outcomes):
    """The coverage section in markdown: counts, then supported classes, refused classes
    grouped by reason, skipped classes grouped by reason."""
    import transformers
    by = {}
    for o in outcomes:
        by.setdefault(o.status, []).append(o)
    counts = ", ".join(f"{len(by.get(s, []))} {s}" for s in ("supported", "refused", "skipped",
                                                               "failed"))
    lines = [f"transformers {transformers.__version__}, {len(outcomes)} classes: {counts} "
             f"(`python -m benchmarks.transformers_coverage`).", ""]
    supported = by.get("supported", [])
    if supported:
        images = [o.name for o in supported if o.inputs != "text"]
        lines += [f"**Supported** ({len(supported)}): the loss and every parameter's gradient "
                  f"equal to the unpatched model's on a text batch"
                  f"{' (with images: ' + ', '.join(images) + ')' if images else ''}.", "",
                  ", ".join(f"`{o.name}`" for o in supported), ""]
    for status, title in (("refused", "Refused"), ("failed", "Failed"),
                          ("skipped", "Not checked (no tiny model built automatically)")):
        group = {}
        for o in by.get(status, []):
            group.setdefault(o.reason, []).append(o.name)
        if not group:
            continue
        head = f"{title} ({len(by[status])})"
        lines += [f"<details><summary>{head}</summary>" if status == "skipped" else
                  f"**{head}**:",
                  "", "| reason | classes |", "|---|---|"]
        for reason, names in sorted(group.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            reason = reason.replace("|", "\\|")
            lines.append(f"| {reason} | {', '.join(f'`{n}`' for n in names)} |")
        lines += ["", "</details>", ""] if status == "skipped" else [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="classes to check (default: every class)")
    parser.add_argument("--output", help="write the markdown table to this file")
    args = parser.parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()
    names = args.names or classes()
    outcomes = []
    for i, name in enumerate(names, 1):
        outcomes.append(check(name))
        o = outcomes[-1]
        print(f"[{i}/{len(names)}] {name}: {o.status} {o.reason} ({o.seconds:.1f} s)",
              file=sys.stderr, flush=True)
    text = table(outcomes)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
