"""fusedloss.integrations.transformers against the unpatched models: tiny random-weight
causal LMs built from configs (no download), float32 on the CPU. The loss and every
parameter's gradient must equal transformers' own, fused or not."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason="the transformers integration needs Hugging Face transformers "
                           "(pip install transformers, or the 'transformers' extra)")

import fusedloss.integrations.transformers as fl_hf  # noqa: E402

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
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=0, eos_token_id=0,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def tiny(name):
    """A float32 model whose logits are far from 0 (the default init gives logits so small
    that the loss is about log(V) whatever the head does)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](),
                                                          attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model.float()


def batch(padded=True):
    ids = torch.randint(0, VOCAB, (3, T))
    labels, mask = ids.clone(), torch.ones_like(ids)
    if padded:  # right padding: not attended, not counted
        labels[0, -4:], mask[0, -4:] = -100, 0
        labels[2, :3] = -100  # a prompt that is not trained on
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def assert_same_step(ours, theirs, inputs, rtol=1e-5, atol=1e-6):
    """Same loss and the same gradient of every parameter."""
    loss, expected = ours(**inputs).loss, theirs(**inputs).loss
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("fused_linear", [True, False], ids=["fused", "loss_function"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_transformers(name, fused_linear):
    theirs = tiny(name)
    ours = fl_hf.apply(copy.deepcopy(theirs), fused_linear=fused_linear)
    if name in ("gemma2", "gpt2"):  # tied embeddings: one tensor, two uses
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    if name == "gemma2":  # the softcapping bends these logits
        raw = ours.model(input_ids=batch()["input_ids"]).last_hidden_state @ \
            ours.lm_head.weight.T
        assert raw.abs().max() > 2 * SOFTCAP
    for inputs in (batch(), {**batch(), "num_items_in_batch": torch.tensor(50)}):
        assert_same_step(ours, theirs, inputs)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)


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
    last = ours(**inputs, return_logits=True, logits_to_keep=1).logits
    torch.testing.assert_close(last, expected.logits[:, -1:])
    # Without labels the model's own forward runs: logits as ever, no loss.
    plain = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert plain.loss is None
    torch.testing.assert_close(plain.logits, expected.logits)
    # return_dict=False: transformers' tuple, loss first, no logits.
    loss, *rest = ours(**inputs, return_dict=False)
    torch.testing.assert_close(loss, expected.loss)
    assert all(not (torch.is_tensor(r) and r.shape[-1:] == (VOCAB,)) for r in rest)


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


def test_apply_again_replaces_the_patch():
    model = fl_hf.apply(tiny("llama"), label_smoothing=0.5)
    fl_hf.apply(model, fused_linear=False)
    assert "forward" not in vars(model)  # the class's forward again
    inputs = batch()
    torch.testing.assert_close(model(**inputs).loss, tiny("llama")(**inputs).loss)
    fl_hf.apply(model)
    assert "_loss_function" not in vars(model)  # transformers' loss_function again


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


def test_unsupported_model_is_refused():
    decoder_only = transformers.LlamaModel(CONFIGS["llama"]())
    with pytest.raises(TypeError, match="LlamaModel") as info:
        fl_hf.apply(decoder_only)
    for name in fl_hf.SUPPORTED:
        assert name in str(info.value)


@pytest.mark.parametrize("options, key", [
    (dict(label_smothing=0.1), "label_smothing"),
    (dict(reduction="sum"), "reduction"),
    (dict(softcap=30.0), "softcap"),
])
def test_unknown_loss_option_is_a_type_error(options, key):
    with pytest.raises(TypeError, match=key):
        fl_hf.apply(tiny("llama"), **options)


def test_chunk_size_needs_the_fused_linear():
    with pytest.raises(TypeError, match="chunk_size.*fused_linear=True"):
        fl_hf.apply(tiny("llama"), fused_linear=False, chunk_size=8)


def test_trainer_matches_the_unpatched_model(tmp_path):
    """Three Trainer steps with gradient accumulation (Trainer then passes
    num_items_in_batch): the same logged losses and the same weights as unpatched (SGD:
    Adam's first steps would turn rounding-level gradients into lr-sized updates)."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    ids = torch.randint(0, VOCAB, (16, T))
    # Unequal counts per row: sum / num_items_in_batch is then not the micro-batch mean.
    data = [{"input_ids": row, "labels": torch.where(torch.arange(T) < i % 7, -100, row)}
            for i, row in enumerate(ids)]
    start = tiny("llama")
    runs = {}
    for patched in (False, True):
        model = copy.deepcopy(start)
        if patched:
            fl_hf.apply(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), max_steps=3, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, optim="sgd", learning_rate=0.1, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        runs[patched] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], model)
    (losses, model), (expected_losses, expected_model) = runs[True], runs[False]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for (name, p), q, p0 in zip(model.named_parameters(), expected_model.parameters(),
                                start.parameters()):
        assert not torch.equal(p, p0), f"{name} did not change"
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


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
