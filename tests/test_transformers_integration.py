"""fusedloss.integrations.transformers against the unpatched models: tiny random-weight
language models built from configs (no download), float32 on the CPU. The loss and every
parameter's gradient must equal transformers' own, fused or not; a model whose loss cannot
be computed exactly must be refused with UnsupportedModel naming its class."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason="the transformers integration needs Hugging Face transformers "
                           "(pip install transformers, or the 'transformers' extra)")

import fusedloss.integrations.transformers as fl_hf  # noqa: E402

try:
    from fusedloss.benchmarks import transformers_coverage as coverage
except ImportError:  # a source checkout that is not installed
    from benchmarks import transformers_coverage as coverage

transformers.logging.set_verbosity_error()
VOCAB, T = 97, 12
SOFTCAP = 3.0
_LAYERS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LAYERS),
    "qwen2": lambda: transformers.Qwen2Config(**_LAYERS),
    "mistral": lambda: transformers.MistralConfig(**_LAYERS),
    "gemma2": lambda: transformers.Gemma2Config(**_LAYERS, head_dim=8,
                                                final_logit_softcapping=SOFTCAP),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_LAYERS, head_dim=8,
                                                    final_logit_softcapping=SOFTCAP),
    "cohere": lambda: transformers.CohereConfig(**_LAYERS, logit_scale=0.25),  # multiplies
    "granite": lambda: transformers.GraniteConfig(**_LAYERS, logits_scaling=4.0),  # divides
    "mixtral": lambda: transformers.MixtralConfig(  # the router's aux loss added to the loss
        **_LAYERS, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=0, eos_token_id=0,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
TIED = ("gemma2", "gemma3", "cohere", "gpt2")


def tiny(name):
    """A float32 model whose logits are far from 0 (the default init gives logits so small
    that the loss is about log(V) whatever the head does)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](),
                                                          attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model.float()


def batch(padded=True, vocab=VOCAB):
    ids = torch.randint(0, vocab, (3, T))
    labels, mask = ids.clone(), torch.ones_like(ids)
    if padded:  # right padding: not attended, not counted
        labels[0, -4:], mask[0, -4:] = -100, 0
        labels[2, :3] = -100  # a prompt that is not trained on
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def assert_same_step(ours, theirs, inputs, rtol=1e-5, atol=1e-6):
    """Same loss and the same gradient of every parameter (dropout, if any, drawn alike)."""
    torch.manual_seed(1)
    loss = ours(**inputs).loss
    torch.manual_seed(1)
    expected = theirs(**inputs).loss
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused_linear", [True, False], ids=["fused", "loss_function"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_transformers(name, fused_linear):
    theirs = tiny(name)
    ours = fl_hf.apply(copy.deepcopy(theirs), fused_linear=fused_linear)
    tied = ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    assert tied == (name in TIED)  # both kinds of head covered
    if name in ("gemma2", "gemma3"):  # the softcapping bends these logits
        raw = ours.model(input_ids=batch()["input_ids"]).last_hidden_state @ \
            ours.lm_head.weight.T
        assert raw.abs().max() > 2 * SOFTCAP
    if name == "mixtral":  # the aux loss is on and counts
        out = theirs(**batch())
        assert out.aux_loss > 0 and out.loss > theirs(**batch(), output_router_logits=False).loss
    for inputs in (batch(), {**batch(), "num_items_in_batch": torch.tensor(50)}):
        assert_same_step(ours, theirs, inputs)


def test_the_transform_is_learnt_from_the_forward_not_the_config():
    """Gemma3ForConditionalGeneration's config carries final_logit_softcapping, which its
    forward never applies (TRL's config-reading fused head applies it); Granite divides by
    logits_scaling where HyperCLOVA X multiplies. The patched losses follow the forwards."""
    cases = (  # class, config edit, the logits had the config been read the other way
        ("Gemma3ForConditionalGeneration",
         lambda c: setattr(c.text_config, "final_logit_softcapping", SOFTCAP),
         lambda x: SOFTCAP * torch.tanh(x / SOFTCAP)),
        ("GraniteForCausalLM", lambda c: setattr(c, "logits_scaling", 4.0), lambda x: x * 16),
        ("HyperCLOVAXForCausalLM", lambda c: setattr(c, "logits_scaling", 0.25),
         lambda x: x * 16))
    for name, edit, misread in cases:
        config, named = coverage.tiny_config(getattr(transformers, name))
        edit(config)
        torch.manual_seed(0)
        theirs = getattr(transformers, name)._from_config(config, attn_implementation="eager")
        with torch.no_grad():
            theirs.get_output_embeddings().weight.mul_(20)
        ours = fl_hf.apply(copy.deepcopy(theirs))
        inputs = coverage.batch(theirs, config, named)
        loss = ours(**inputs).loss
        assert_same_step(ours, theirs, inputs, rtol=1e-5, atol=1e-5)
        # Read from the config, the transform would have given another loss.
        logits = theirs(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        target = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
        wrong = F.cross_entropy(misread(logits).reshape(target.numel(), -1), target)
        assert (wrong - loss).abs() > 1e-2, name


def test_a_z_loss_on_the_logits_is_refused_only_when_it_runs():
    """Bamba adds a z-loss computed on the logits when its coefficient is > 0: refused at
    the first labelled forward, before any loss is returned; with 0, computed exactly."""
    config, named = coverage.tiny_config(transformers.BambaForCausalLM)
    torch.manual_seed(0)
    theirs = transformers.BambaForCausalLM(config)
    ours = fl_hf.apply(copy.deepcopy(theirs))
    inputs = coverage.batch(theirs, config, named)
    assert_same_step(ours, theirs, inputs)
    ours.z_loss_coefficient = 1e-3
    with pytest.raises(fl_hf.UnsupportedModel,
                       match="^BambaForCausalLM: the forward computes logsumexp of the logits "
                             r"\(a z-loss\)"):
        ours(**inputs)


def test_shift_labels_and_ignore_index_as_transformers():
    theirs = tiny("llama")
    ours = fl_hf.apply(copy.deepcopy(theirs))
    inputs = batch()
    shift = torch.randint(0, VOCAB, inputs["labels"].shape)
    shift[1, ::2] = 7
    assert_same_step(ours, theirs, {**inputs, "shift_labels": shift, "ignore_index": 7})


def test_logits_only_when_asked():
    """With labels: no logits in training mode, logits in eval mode (Trainer's evaluate
    and predict), return_logits overriding both."""
    theirs = tiny("gemma2")
    ours = fl_hf.apply(copy.deepcopy(theirs))
    inputs = batch()
    expected = theirs(**inputs)
    assert ours.training and ours(**inputs).logits is None
    ours.eval()
    out = ours(**inputs)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    assert ours(**inputs, return_logits=False).logits is None
    ours.train()
    out = ours(**inputs, return_logits=True)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    # Labels with fewer logits than positions: an error, as from transformers.
    for return_logits in (True, False):
        with pytest.raises(ValueError, match="batch_size"):
            ours(**inputs, return_logits=return_logits, logits_to_keep=1)
    with pytest.raises(ValueError, match="batch_size"):
        theirs(**inputs, logits_to_keep=1)
    # Without labels the model's own forward runs: logits as ever, no loss.
    plain = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert plain.loss is None
    torch.testing.assert_close(plain.logits, expected.logits)
    # return_dict=False: transformers' tuple, loss first, no logits.
    loss, *rest = ours(**inputs, return_dict=False)
    torch.testing.assert_close(loss, expected.loss)
    assert all(not (torch.is_tensor(r) and r.shape[-1:] == (VOCAB,)) for r in rest)


def test_generation_is_unchanged():
    theirs = tiny("gemma2").eval()
    ours = fl_hf.apply(copy.deepcopy(theirs))
    prompt = batch()["input_ids"][:, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), theirs.generate(prompt, **kwargs))


def test_loss_options_pass_through():
    """label_smoothing and z_loss reach fusedloss: the loss is the formula on the
    unpatched model's logits, fused (in chunks of 8 rows) or not."""
    model = tiny("llama")
    inputs = batch()
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    target = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    logits = logits.reshape(-1, VOCAB)
    counted = target != -100
    expected = F.cross_entropy(logits, target, label_smoothing=0.1) + \
        1e-2 * (logits.logsumexp(-1)[counted] ** 2).mean()
    options = dict(label_smoothing=0.1, z_loss=1e-2)
    for patched in (fl_hf.apply(copy.deepcopy(model), chunk_size=8, **options),
                    fl_hf.apply(copy.deepcopy(model), fused_linear=False, **options),
                    fl_hf.apply(copy.deepcopy(model), backend="reference", **options)):
        torch.testing.assert_close(patched(**inputs).loss, expected, rtol=1e-5, atol=1e-6)


def test_logit_scale_multiplies_the_logits_the_model_passes_to_its_loss():
    """The model's softcap first, then the option's scale: the same loss fused or not."""
    model = tiny("gemma2")
    inputs = batch()
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    target = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    expected = F.cross_entropy(0.5 * logits.reshape(-1, VOCAB), target)
    for fused_linear in (True, False):
        patched = fl_hf.apply(copy.deepcopy(model), fused_linear=fused_linear, logit_scale=0.5)
        torch.testing.assert_close(patched(**inputs).loss, expected, rtol=1e-5, atol=1e-6)


def test_apply_again_replaces_the_patch_and_restore_removes_it():
    model = fl_hf.apply(tiny("llama"), label_smoothing=0.5)
    fl_hf.apply(model, fused_linear=False)
    inputs = batch()
    torch.testing.assert_close(model(**inputs).loss, tiny("llama")(**inputs).loss)
    fl_hf.restore(model)
    assert "forward" not in vars(model) and "_loss_function" not in vars(model)
    assert "return_logits" not in inspect.signature(model.forward).parameters
    fl_hf.restore(model)  # a no-op on an unpatched model


def test_autocast_runs_the_head_in_its_dtype():
    theirs = tiny("gpt2")
    ours = fl_hf.apply(copy.deepcopy(theirs))
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, expected = ours(**inputs).loss, theirs(**inputs).loss
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fused_linear", [True, False])
def test_bfloat16_model_gets_a_float32_loss(fused_linear):
    """A bfloat16 model's loss is float32, as transformers' (it upcasts the logits), and
    within bfloat16 rounding of it; the gradients are the parameters' dtype."""
    theirs = tiny("llama").to(torch.bfloat16)
    ours = fl_hf.apply(copy.deepcopy(theirs), fused_linear=fused_linear)
    inputs = batch()
    loss, expected = ours(**inputs).loss, theirs(**inputs).loss
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    loss.backward()
    head = ours.get_output_embeddings().weight
    assert head.grad is not None and head.grad.dtype == torch.bfloat16


def test_a_model_without_an_lm_loss_is_refused_at_apply():
    decoder_only = transformers.LlamaModel(CONFIGS["llama"]())
    with pytest.raises(fl_hf.UnsupportedModel, match="^LlamaModel: .*no output embeddings"):
        fl_hf.apply(decoder_only)
    classifier = transformers.LlamaForSequenceClassification(CONFIGS["llama"]())
    with pytest.raises(TypeError, match="^LlamaForSequenceClassification: its loss_function"):
        fl_hf.apply(classifier)
    with pytest.raises(fl_hf.UnsupportedModel, match="Linear: not a transformers"):
        fl_hf.apply(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("options, key", [
    (dict(label_smothing=0.1), "label_smothing"),
    (dict(reduction="sum"), "reduction"),
    (dict(softcap=30.0), "softcap"),
])
def test_unknown_loss_option_is_a_type_error(options, key):
    with pytest.raises(TypeError, match=key):
        fl_hf.apply(tiny("llama"), **options)


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError, match="chunk_size.*fused_linear=True"):
        fl_hf.apply(tiny("llama"), fused_linear=False, chunk_size=8)
    with pytest.raises(TypeError, match="fused_linear must be a bool"):
        fl_hf.apply(tiny("llama"), fused_linear="yes")
    with pytest.raises(TypeError, match="verify must be"):
        fl_hf.apply(tiny("llama"), verify="yes")


# ------------------------------------------------------------------ planted deviations
def planted(deviation):
    """A Llama causal LM whose forward applies `deviation(model, logits, labels)` to its
    logits between its head and its loss; returns (logits, loss or None)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Planted(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
            logits = self.lm_head(hidden.last_hidden_state)
            logits, loss = deviation(self, logits, labels)
            if loss is None and labels is not None:
                loss = self.loss_function(logits, labels, logits.shape[-1], **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    Planted.__name__ = Planted.__qualname__ = "PlantedForCausalLM"
    torch.manual_seed(0)
    model = Planted(CONFIGS["llama"]())
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _z_loss(model, logits, labels):
    loss = model.loss_function(logits, labels, VOCAB)
    return logits, loss + 1e-4 * logits.logsumexp(-1).pow(2).mean()


def _own_cross_entropy(model, logits, labels):
    return logits, F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


def _write(model, logits, labels):
    logits[:, :, 0] = torch.finfo(logits.dtype).min
    return logits, None


REFUSED = {  # deviation: what the refusal says
    "logsumexp": (_z_loss, "logsumexp"),
    "vocab slice": (lambda m, x, y: (x[..., :VOCAB - 1], None), "slices the vocabulary"),
    "tensor scale": (lambda m, x, y: (x * torch.tensor(2.0), None), "by a tensor"),
    "head twice": (lambda m, x, y: (x + 0.0 * m.lm_head(torch.ones(32)), None),
                   "more than once"),
    "own cross_entropy": (_own_cross_entropy, "its own cross-entropy"),
    "bias": (lambda m, x, y: (x + torch.ones(VOCAB), None), "adds to the logits"),
    "write": (_write, "writes into the logits"),
    "tanh twice": (lambda m, x, y: (torch.tanh(torch.tanh(x)), None), "tanh to the logits twice"),
    "softmax": (lambda m, x, y: (x.softmax(-1), None), "softmax"),
    "negative scale": (lambda m, x, y: (x * -1.0, None), "not a positive number"),
}


@pytest.mark.parametrize("deviation", list(REFUSED))
def test_a_planted_deviation_is_refused_naming_the_class(deviation):
    fn, says = REFUSED[deviation]
    model = fl_hf.apply(planted(fn))
    inputs = batch()
    with pytest.raises(fl_hf.UnsupportedModel, match=f"^PlantedForCausalLM: .*{says}"):
        model(**inputs)
    # Without labels the forward is the model's own; with verify=True, refused at apply.
    if deviation not in ("logsumexp", "own cross_entropy"):
        assert model(input_ids=inputs["input_ids"]).loss is None
    with pytest.raises(fl_hf.UnsupportedModel, match="^PlantedForCausalLM: "):
        fl_hf.apply(model, verify=True)
    assert "forward" not in vars(model)  # a refusal at apply leaves the model unpatched


def test_a_loss_not_through_loss_function_is_refused_with_fused_linear_false():
    model = fl_hf.apply(planted(_own_cross_entropy), fused_linear=False)
    with pytest.raises(fl_hf.UnsupportedModel,
                       match="^PlantedForCausalLM: .*without model.loss_function"):
        model(**batch())


ACCEPTED = {  # deviation within what maps exactly onto fusedloss
    "scale then softcap": lambda m, x, y: (2.0 * torch.tanh(x * 0.5 / 2.0), None),
    "in place": lambda m, x, y: (torch.tanh(x.mul_(0.5).div_(2.0)) * 3.0, None),
    "cast, negate twice": lambda m, x, y: (-(-x.float() / 4), None),
    "positions": lambda m, x, y: (
        x[:, :-1], m.loss_function(x[:, :-1].contiguous(), None, VOCAB,
                                   shift_labels=y[:, 1:].contiguous())),
    "flattened": lambda m, x, y: (
        x, m.loss_function(x.view(-1, VOCAB), None, VOCAB,
                           shift_labels=F.pad(y, (0, 1), value=-100)[:, 1:].reshape(-1))),
}


@pytest.mark.parametrize("deviation", list(ACCEPTED))
def test_a_planted_transform_that_maps_exactly_is_computed(deviation):
    theirs = planted(ACCEPTED[deviation])
    ours = fl_hf.apply(copy.deepcopy(theirs), verify=True)
    for inputs in (batch(), {**batch(), "num_items_in_batch": torch.tensor(30)}):
        assert_same_step(ours, theirs, inputs)


def test_verify_compares_with_the_model_own_loss():
    model = fl_hf.apply(tiny("gemma2"), verify=True)
    assert "forward" in vars(model)
    inputs = batch()
    fl_hf.apply(model, verify=inputs)  # the user's own batch
    with pytest.raises(ValueError, match="labels"):
        fl_hf.apply(model, verify={"input_ids": inputs["input_ids"]})


# ------------------------------------------------------------------ vision-language models
def tiny_vlm(name):
    """A tiny VLM, its config, and a batch with images: Llava (a CLIP tower, 4 image tokens
    per image) or Qwen2-VL (4 x 4 patches merged into 4 image tokens)."""
    config, named = coverage.tiny_config(getattr(transformers, name))
    if name == "LlavaForConditionalGeneration":
        config.vision_config.image_size = 28  # 2 x 2 patches of 14: 4 image tokens
    torch.manual_seed(0)
    model = getattr(transformers, name)._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model, config, named


def vlm_batch(name, config, named, n=2):
    image = config.image_token_id
    allowed = torch.tensor([i for i in range(coverage.VOCAB - 16) if i not in named])
    text = allowed[torch.randint(len(allowed), (n, T - 4))]
    ids = torch.cat([torch.full((n, 4), image), text], dim=1)
    labels = torch.where(ids == image, -100, ids)
    labels[0, -2:] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if name == "LlavaForConditionalGeneration":
        inputs["pixel_values"] = torch.randn(n, 3, 28, 28)
    else:  # Qwen2-VL: flattened patches (channels x temporal x patch x patch) and their grid
        v = config.vision_config
        inputs["pixel_values"] = torch.randn(n * 16, 3 * v.temporal_patch_size * v.patch_size ** 2)
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * n)
        inputs["mm_token_type_ids"] = (ids == image).long()
    return inputs


@pytest.mark.parametrize("name", ["LlavaForConditionalGeneration",
                                  "Qwen2VLForConditionalGeneration"])
def test_vision_language_model_with_images(name):
    theirs, config, named = tiny_vlm(name)
    ours = fl_hf.apply(copy.deepcopy(theirs))
    inputs = vlm_batch(name, config, named)
    # The images count: the loss differs from the same text with other images.
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    assert not torch.allclose(theirs(**inputs).loss, theirs(**other).loss)
    for inputs in (inputs, {**inputs, "num_items_in_batch": torch.tensor(9)}):
        assert_same_step(ours, theirs, inputs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ peft
def test_peft_modules_to_save_head_is_followed_and_lora_on_the_head_refused():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    theirs = peft.get_peft_model(tiny("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    ours = fl_hf.apply(copy.deepcopy(theirs))
    inputs = batch()
    assert_same_step(ours, theirs, inputs)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad and "lm_head" in n]
    assert trained and all("modules_to_save" in n for n in trained)
    lora_head = peft.get_peft_model(tiny("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(fl_hf.UnsupportedModel, match="^LlamaForCausalLM: .*LoRA"):
        fl_hf.apply(lora_head)


# ------------------------------------------------------------------ accelerate
def test_accelerate_offloaded_model():
    """cpu_offload: every weight on the meta device except inside its module's forward,
    where accelerate's hook (wrapping the forward) loads it. The patched model's head is
    loaded once a forward, for the fused loss (the call that returns the stand-in runs no
    hook), and the loss and the gradient of the inputs equal the unpatched model's."""
    accelerate = pytest.importorskip("accelerate")
    theirs = tiny("llama")
    ours = copy.deepcopy(theirs)
    for model in (theirs, ours):
        accelerate.cpu_offload(model, execution_device="cpu")
    fl_hf.apply(ours)
    head = ours.get_output_embeddings()
    assert head.weight.is_meta
    loads = []
    pre_forward = head._hf_hook.pre_forward
    head._hf_hook.pre_forward = lambda *a, **k: loads.append(1) or pre_forward(*a, **k)
    inputs = batch()
    del inputs["input_ids"]  # embeddings instead, for their gradient
    embeds = torch.randn(3, T, _LAYERS["hidden_size"])
    mine, their = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    out = ours(inputs_embeds=mine, **inputs)
    expected = theirs(inputs_embeds=their, **inputs)
    assert out.logits is None and loads == [1] and head.weight.is_meta
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(mine.grad, their.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ every class
_OUTCOMES = {}


def _outcome(name):
    if name not in _OUTCOMES:
        _OUTCOMES[name] = coverage.check(name)
    return _OUTCOMES[name]


@pytest.mark.parametrize("name", coverage.classes())
def test_every_language_model_class_is_exact_or_refused(name):
    """Every causal-LM and conditional-generation class of the installed transformers,
    tiny: the patched loss and gradients equal the unpatched model's, or apply() / the
    first labelled forward raises UnsupportedModel naming the class. Classes whose tiny
    model cannot be built automatically are skipped with the reason."""
    outcome = _outcome(name)
    if outcome.status == "skipped":
        pytest.skip(outcome.reason)
    assert outcome.status in ("supported", "refused"), outcome.reason
    assert outcome.status == "supported" or outcome.reason


def test_coverage():
    """At least 200 classes computed exactly (transformers 5.25: see the README's table)."""
    outcomes = [_outcome(name) for name in coverage.classes()]
    supported = sum(o.status == "supported" for o in outcomes)
    assert not [o for o in outcomes if o.status == "failed"]
    if transformers.__version__.startswith("5.25."):
        assert supported >= 200, coverage.table(outcomes)


# ------------------------------------------------------------------ Trainer
def _trainer_run(model, data, tmp_path, collator=None):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, optim="sgd", learning_rate=0.1, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=collator)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _text_data(vocab):
    ids = torch.randint(0, vocab, (16, T))
    # Unequal counts per row: sum / num_items_in_batch is then not the micro-batch mean.
    return [{"input_ids": row, "labels": torch.where(torch.arange(T) < i % 7, -100, row)}
            for i, row in enumerate(ids)]


def _vlm_data():
    name = "LlavaForConditionalGeneration"
    start, config, named = tiny_vlm(name)
    inputs = vlm_batch(name, config, named, n=16)
    for i in range(16):
        inputs["labels"][i, 4:4 + i % 5] = -100
    return start, [{k: v[i] for k, v in inputs.items()} for i in range(16)]


@pytest.mark.parametrize("name", ["llama", "mixtral", "llava"])
def test_trainer_matches_the_unpatched_model(name, tmp_path):
    """Three Trainer steps with gradient accumulation (Trainer then passes
    num_items_in_batch): the same logged losses and the same weights as unpatched (SGD:
    Adam's first steps would turn rounding-level gradients into lr-sized updates)."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    torch.manual_seed(0)
    if name == "llava":
        start, data = _vlm_data()
    else:
        start, data = tiny(name), _text_data(VOCAB)
    runs = {}
    for patched in (False, True):
        model = copy.deepcopy(start)
        if patched:
            fl_hf.apply(model)
        torch.manual_seed(0)
        runs[patched] = (_trainer_run(model, data, tmp_path / str(patched)), model)
    (losses, model), (expected_losses, expected_model) = runs[True], runs[False]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    changed = 0
    for (name_, p), q, p0 in zip(model.named_parameters(), expected_model.parameters(),
                                 start.parameters()):
        changed += not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name_)
    assert changed > len(list(start.parameters())) // 2


def test_e2e_benchmark_measures_every_provider():
    """benchmarks/e2e.py at a tiny size, in this process: a row per provider, and the
    parameter count its FLOP and byte figures use is the model's."""
    try:
        from fusedloss.benchmarks import cases, e2e
    except ImportError:  # a source checkout that is not installed
        from benchmarks import cases, e2e
    sizes = dict(batch=2, seq=16, hidden=64, layers=1, vocab=VOCAB)
    model, _ = e2e.build("hf", hidden=64, layers=1, vocab=VOCAB, seq=16, device="cpu",
                         dtype="float32")
    assert sum(p.numel() for p in model.parameters()) == e2e.parameter_count(64, 1, VOCAB)
    case = cases.LlamaStep("llama_step", 32, VOCAB, d=64, seq=16, layers=1)
    assert case.make_inputs(torch.device("cpu"))[0].shape == (2, 16)
    assert case.flops() == e2e.step_flops(**sizes) > 0
    for provider in e2e.PROVIDERS:
        row = e2e.measure_step(provider, **sizes, steps=2, warmup=1)
        assert row["status"] == "ok" and row["step_ms"] > 0 and row["tokens_per_s"] > 0
