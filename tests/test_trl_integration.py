"""fusedloss.integrations.trl against TRL's own fused LM head: ChunkedLogProbFunction on
the same inputs, add_fused_lm_head on tiny random Llama and Gemma 2 models (softcap),
DPO and GRPO trainer steps, and the ZeRO-3 gather held through the backward."""
import contextlib
import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs TRL (pip install trl)")
transformers = pytest.importorskip("transformers")

import fusedloss.integrations.trl as fl_trl  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402
from test_transformers_integration import VOCAB, tiny  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

pytestmark = pytest.mark.skipif(trl.__version__ not in fl_trl.TESTED_VERSIONS,
                                reason=f"TRL {trl.__version__} is not a tested version")
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture
def applied():
    fl_trl.apply()
    try:
        yield
    finally:
        fl_trl.restore()


def _run(fn, h, w, b, t, g, k, *args):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    out = fn.apply(leaves[0], leaves[1], leaves[2], t, *args)
    ((out[0] * g).sum() + (out[1] * k).sum()).backward()
    return out, [x.grad for x in leaves if x is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("options", [(1.0, 32, None, 1.0), (0.7, 32, 5.0, 1.3)],
                         ids=["plain", "softcap"])
def test_same_as_trls_chunked_log_prob_function(bias, options):
    torch.manual_seed(0)
    n, d = 37, 16
    h, w = torch.randn(n, d), torch.randn(VOCAB, d) * 0.5
    b = torch.randn(VOCAB) if bias else None
    t = torch.randint(0, VOCAB, (n,))
    g, k = torch.randn(n), torch.randn(n)
    theirs, their_grads = _run(ChunkedLogProbFunction, h, w, b, t, g, k, *options, OUTPUTS)
    ours, our_grads = _run(fl_trl.ChunkedLogProbs, h, w, b, t, g, k, *options, OUTPUTS)
    assert [o.dtype for o in ours] == [o.dtype for o in theirs]
    assert torch.equal(ours[4], theirs[4])
    for a, e in [*zip(ours[:4], theirs[:4]), *zip(our_grads, their_grads)]:
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-6)
    only = fl_trl.ChunkedLogProbs.apply(h, w, b, t, *options, ())
    assert only[1:] == (None,) * 4 and torch.allclose(only[0], ours[0])


def test_apply_restore_and_version_check(monkeypatch):
    original = trl_utils._ChunkedLogProbFunction
    fl_trl.apply()
    fl_trl.apply()  # idempotent
    assert trl_utils._ChunkedLogProbFunction is fl_trl.ChunkedLogProbs
    fl_trl.restore()
    assert trl_utils._ChunkedLogProbFunction is original
    monkeypatch.setattr(trl, "__version__", "0.0.1")
    with pytest.raises(RuntimeError, match="1.16.0"):
        fl_trl.apply()
    assert trl_utils._ChunkedLogProbFunction is original


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_fused_lm_head_outputs_and_gradients(name):
    """add_fused_lm_head's outputs and every parameter's gradient, TRL's kernel and
    fusedloss's, on the same model and batch (padding labels included)."""
    theirs = tiny(name)
    ours = copy.deepcopy(theirs)
    for m in (theirs, ours):
        trl_utils.add_fused_lm_head(m, temperature=0.8, outputs=("log_probs",) + OUTPUTS)
    ids = torch.randint(0, VOCAB, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    results = []
    for model, patched in ((theirs, False), (ours, True)):
        if patched:
            fl_trl.apply()
        try:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            (out.loss - 0.1 * out.entropy.sum()).backward()
        finally:
            fl_trl.restore()
        results.append(out)
    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(results[1], field), getattr(results[0], field),
                                   rtol=1e-5, atol=1e-5, msg=field)
    assert torch.equal(results[1].is_top1, results[0].is_top1)
    for (pname, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=pname)


def test_zero3_gather_holds_in_the_backward(monkeypatch, applied):
    """Under ZeRO-3 the head's weight holds its values only inside TRL's gather context:
    the backward must run inside it again. A stand-in for DeepSpeed's partitioning (the
    weight zeroed outside the context) shows it: a backward outside gets wrong gradients."""
    torch.manual_seed(0)
    n, d = 9, 8
    full = torch.randn(VOCAB, d)
    weight = torch.nn.Parameter(torch.zeros(VOCAB, d))
    entered = []

    @contextlib.contextmanager
    def gather(w, b):
        entered.append(True)
        w.data = full.clone()
        try:
            yield
        finally:
            w.data = torch.zeros(VOCAB, d)

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", gather)
    monkeypatch.setattr(fl_trl, "_zero3", lambda: True)
    h = torch.randn(n, d, requires_grad=True)
    t = torch.randint(0, VOCAB, (n,))
    with gather(weight, None):
        out = fl_trl.ChunkedLogProbs.apply(h, weight, None, t, 1.0, 32, None, 1.0, OUTPUTS)
    (out[0].sum() + out[1].sum()).backward()
    assert len(entered) == 2
    h2, w2 = h.detach().clone().requires_grad_(), full.clone().requires_grad_()
    ref = ChunkedLogProbFunction.apply(h2, w2, None, t, 1.0, 32, None, 1.0, OUTPUTS)
    (ref[0].sum() + ref[1].sum()).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ trainers
def tokenizer():
    """A word-level tokenizer built here (no download): words w0.., <unk>, <pad>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<unk>": VOCAB - 3, "<pad>": VOCAB - 2, "</s>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                pad_token="<pad>", eos_token="</s>")


def _words(rng, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=rng))


def _train(make_trainer, path, patched):
    """Train the tiny Llama saved at `path` a few steps (the trainer loads it, and its
    reference model, from there); its final parameters and logged losses."""
    if patched:
        fl_trl.apply()
    try:
        trainer = make_trainer(str(path))
        trainer.train()
    finally:
        fl_trl.restore()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}, losses


def _same_training(make_trainer, tmp_path):
    model = tiny("llama")
    model.config.pad_token_id, model.config.eos_token_id = VOCAB - 2, VOCAB - 1
    model.save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    theirs, their_losses = _train(make_trainer, tmp_path / "model", patched=False)
    ours, our_losses = _train(make_trainer, tmp_path / "model", patched=True)
    assert len(our_losses) == len(their_losses) >= 2
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-4, atol=1e-5)
    start = model.state_dict()
    for name, p in ours.items():
        torch.testing.assert_close(p, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    # The steps moved the model: the comparison is not of two untouched copies.
    assert any(not torch.equal(p, start[n]) for n, p in ours.items())


COMMON = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=0.5, optim="sgd",
              report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
              dataloader_num_workers=0, bf16=False)  # float32: equal to its rounding


def test_dpo_trainer_steps(tmp_path):
    import datasets
    rng = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({
        "prompt": [_words(rng, 5) for _ in range(4)],
        "chosen": [" " + _words(rng, 4) for _ in range(4)],
        "rejected": [" " + _words(rng, 3) for _ in range(4)]})

    def make(model):
        args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, **COMMON)
        return trl.DPOTrainer(model=model, args=args, train_dataset=data,
                              processing_class=tokenizer())
    _same_training(make, tmp_path)


def test_grpo_trainer_steps(tmp_path):
    """GRPO with a KL term (beta > 0) and an entropy bonus, tiny generations, a toy reward."""
    import datasets
    rng = torch.Generator().manual_seed(1)
    data = datasets.Dataset.from_dict({"prompt": [_words(rng, 4) for _ in range(4)]})

    def reward(completions, **kwargs):  # prefers completions with low word numbers
        return [-float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit())) / 100
                for c in completions]

    def make(model):
        args = trl.GRPOConfig(output_dir=str(tmp_path), beta=0.1, entropy_coef=0.01,
                              num_generations=2, max_completion_length=4, **COMMON)
        return trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                               train_dataset=data, processing_class=tokenizer())
    _same_training(make, tmp_path)
