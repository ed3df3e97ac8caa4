"""The small Llama of the end-to-end cases: its config, size, FLOPs and bytes, and one
training step. Built from a config through transformers (no download); transformers is
imported only when a model is built, so the case tables can use this module without it.

Both users of the model read it from here: cases.LlamaStep (its inputs, bytes and FLOPs)
with the runner's "hf*" providers (`runner_step`), and e2e.py (its own command line).
"""
import torch

# name -> fusedloss.integrations.transformers.apply() arguments (None: transformers' loss)
PATCHES = {"hf": None, "hf-fusedloss-ce": {"fused_linear": False},
           "hf-fusedloss-linear": {"fused_linear": True}}
HEAD_DIM = 64


def _shape(hidden):
    """Heads, key-value heads and the MLP width of the config (Llama's proportions)."""
    heads = max(1, hidden // HEAD_DIM)
    return heads, heads, (8 * hidden // 3 + 63) // 64 * 64


# The models: Llama, and a mixture of experts of the same proportions (Mixtral: 4 experts
# of which 2 per token, its router's auxiliary load-balancing loss added to the loss).
MODELS = ("llama", "mixtral")


def config(hidden, layers, vocab, seq, model="llama"):
    import transformers
    heads, kv_heads, intermediate = _shape(hidden)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=seq,
                  tie_word_embeddings=False)
    if model == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4,
                                          num_experts_per_tok=2, output_router_logits=True,
                                          router_aux_loss_coef=0.02)
    return transformers.LlamaConfig(**common)


def parameter_count(hidden, layers, vocab):
    heads, kv_heads, intermediate = _shape(hidden)
    kv = kv_heads * hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden  # embedding, head, final norm


def step_flops(batch, seq, hidden, layers, vocab):
    """Matmul FLOPs of forward + backward (3 x the forward's): the projections, the MLP and
    the LM head per token, and the attention scores and their use (QK^T, PV) in full."""
    heads, kv_heads, intermediate = _shape(hidden)
    kv = kv_heads * hidden // heads
    per_token = 2 * (layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
                     + vocab * hidden)
    attention = layers * 2 * 2 * batch * seq * seq * hidden
    return 3 * (batch * seq * per_token + attention)


def step_min_bytes(batch, seq, hidden, layers, vocab, itemsize):
    """Bytes a step moves at the least: every parameter read by the forward and by the
    backward, its gradient written, AdamW's update (read the parameter, its gradient and two
    moments, write the parameter and the moments), and the token ids."""
    return 10 * parameter_count(hidden, layers, vocab) * itemsize + 8 * batch * seq


def build(patch, *, hidden, layers, vocab, seq, device, dtype, model="llama"):
    """The model (patched as PATCHES[patch] says) and its AdamW optimizer."""
    import transformers
    torch.manual_seed(0)
    cls = transformers.MixtralForCausalLM if model == "mixtral" else transformers.LlamaForCausalLM
    model = cls(config(hidden, layers, vocab, seq, model))
    model = model.to(device=device, dtype=getattr(torch, dtype)).train()
    if PATCHES[patch] is not None:
        import fusedloss.integrations.transformers
        fusedloss.integrations.transformers.apply(model, **PATCHES[patch])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def token_ids(batch, seq, vocab, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), device=device, generator=gen)


def train_step(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def runner_step(case, patch):
    """fn(ids) -> loss for the runner's measure_provider (case: cases.LlamaStep): the model
    is built on the first call, on the ids' device; each later call first applies the
    previous step's AdamW update, so fwd + bwd is one training step."""
    state = {}

    def step(ids):
        if not state:
            state["model"], state["optimizer"] = build(
                patch, hidden=case.d, layers=case.layers, vocab=case.c, seq=case.seq,
                device=ids.device, dtype=case.dtype)
        elif any(p.grad is not None for p in state["model"].parameters()):
            state["optimizer"].step()
            state["optimizer"].zero_grad(set_to_none=True)
        return state["model"](input_ids=ids, labels=ids).loss
    return step
