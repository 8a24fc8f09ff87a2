"""Fine-tunes that added tokens: compressed, carried, and loaded onto the original base, which is resized first."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from test_streaming import loaded, save_pair
from tiny_models import logits, make_finetune, make_model, make_tokenizer, random_ids

from hf_deltacome import DeltaCoMeConfig
from hf_deltacome.compression.pipeline import compress
from hf_deltacome.errors import (
    BaseModelMismatchError,
    DegenerateAdapterWarning,
    IncompatibleModelsError,
)

ADDED = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@torch.no_grad()
def with_added_tokens(ft, n: int = ADDED, seed: int = 0, change_rows: bool = False):
    """``ft`` resized by ``n`` tokens (rows appended, as ``resize_token_embeddings`` does), new rows trained."""
    vocab = ft.get_input_embeddings().weight.shape[0]
    ft.resize_token_embeddings(vocab + n, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    emb, head = ft.get_input_embeddings().weight, ft.get_output_embeddings().weight
    emb[vocab:] = 0.05 * torch.randn(n, emb.shape[1], generator=g)
    if head is not emb:
        head[vocab:] = 0.05 * torch.randn(n, head.shape[1], generator=g)
    if change_rows:  # the fine-tune also trained some of the old rows
        emb[:3] += 0.05 * torch.randn(3, emb.shape[1], generator=g)
    return ft


def new_token_ids(vocab: int, n: int = 4, seq: int = 16) -> torch.Tensor:
    ids = random_ids(make_model("llama"), n, seq, seed=9)
    ids[:, ::3] = torch.arange(vocab - ADDED, vocab).repeat(seq)[: ids[:, ::3].numel()].view(n, -1)
    return ids


@pytest.mark.parametrize("tied", [False, True])
def test_added_tokens_round_trip_onto_the_original_base(tmp_path, tied):
    ref = make_model("llama", tie_word_embeddings=tied)
    ft = with_added_tokens(make_finetune(ref, scale=0.0, noise=0.0), seed=1)
    with pytest.warns(DegenerateAdapterWarning, match=r"no target linear changed.*8 added token"):
        model = compress(make_model("llama", tie_word_embeddings=tied), ft, DeltaCoMeConfig(ratio="1/2"),
                         calibration=random_ids(ref, 4, 16), progress=False)  # fmt: skip
    cfg = model.peft_config["default"]
    assert (cfg.base_vocab_size, cfg.vocab_size) == (250, 258)
    rows = list(range(250, 258))
    assert cfg.trainable_token_indices == ({"model.embed_tokens": rows} if tied else {"model.embed_tokens": rows, "lm_head": rows})
    assert not any(m in (cfg.modules_to_save or []) for m in ("model.embed_tokens", "lm_head"))  # old rows: base's
    ids = new_token_ids(258)
    torch.testing.assert_close(logits(model, ids), logits(ft, ids), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    original = make_model("llama", tie_word_embeddings=tied)  # 250 tokens: resized when the adapter loads
    again = PeftModel.from_pretrained(original, tmp_path).eval()
    assert again.get_input_embeddings().weight.shape[0] == 258 and original.config.vocab_size == 258
    torch.testing.assert_close(logits(again, ids), logits(ft, ids), atol=1e-5, rtol=1e-5)


def test_added_tokens_with_a_real_delta_and_trained_old_rows(tmp_path):
    ref = make_model("llama")
    ft = with_added_tokens(make_finetune(ref, seed=2), seed=2, change_rows=True)
    model = compress(make_model("llama"), ft, DeltaCoMeConfig(ratio="1/2"), calibration=random_ids(ref, 16, 48),
                     progress=False)  # fmt: skip
    cfg = model.peft_config["default"]
    assert "model.embed_tokens" in cfg.modules_to_save  # its first rows changed: carried whole, 258 rows
    assert cfg.trainable_token_indices == {"lm_head": list(range(250, 258))}
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    ids = new_token_ids(258)
    torch.testing.assert_close(logits(again, ids), logits(model, ids))
    old = ids.clamp(max=249)  # the fine-tune's effect on the old tokens, as far as the base can say
    lf, lb, la = logits(ft, old)[..., :250], logits(ref, old), logits(again, old)[..., :250]
    assert float((la - lf).norm() / (lf - lb).norm()) < 0.3
    # the new tokens' output rows are the fine-tune's own (carried, not approximated)
    torch.testing.assert_close(
        again.get_output_embeddings().token_adapter.trainable_tokens_delta["default"], ft.lm_head.weight[250:]
    )


def test_streamed_added_tokens_match_the_loaded_path(tmp_path):
    base = make_model("llama", seed=5)
    ft = with_added_tokens(make_finetune(base, seed=5), seed=5)
    b, f = save_pair(tmp_path, base, ft)
    cfg = DeltaCoMeConfig(ratio="1/4", min_rank_share=0.0, distill_bands=False)  # streamed: distilled per layer
    ids = random_ids(base, 4, 16)
    reference = compress(loaded(b), loaded(f), cfg, calibration=ids, tokenizer=make_tokenizer(),
                         base_tokenizer=make_tokenizer(), progress=False)  # fmt: skip
    streamed = compress(b, f, cfg, calibration=ids, progress=False)
    streamed.save_pretrained(tmp_path / "s")
    reference.save_pretrained(tmp_path / "r")
    assert (tmp_path / "s/adapter_model.safetensors").read_bytes() == (tmp_path / "r/adapter_model.safetensors").read_bytes()
    again = PeftModel.from_pretrained(loaded(b), tmp_path / "s").eval()
    torch.testing.assert_close(logits(again, new_token_ids(258)), logits(reference, new_token_ids(258)))


def test_the_base_check_reads_only_the_original_rows(tmp_path):
    ref = make_model("llama")
    ft = with_added_tokens(make_finetune(ref, scale=0.0, noise=0.0), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateAdapterWarning)
        compress(make_model("llama"), ft, DeltaCoMeConfig(quantizer="rtn"), progress=False).save_pretrained(tmp_path)
    resized_by_hand = make_model("llama")
    resized_by_hand.resize_token_embeddings(258)  # new rows random: not part of the check
    PeftModel.from_pretrained(resized_by_hand, tmp_path)
    other = make_model("llama")
    with torch.no_grad():
        other.get_input_embeddings().weight[7] += 0.1  # an original row differs: another base
    with pytest.raises(BaseModelMismatchError, match="model.embed_tokens.weight rows 0-249"):
        PeftModel.from_pretrained(other, tmp_path)


def swapped_tokenizer(i: int, j: int):
    """The tiny models' tokenizer with tokens ``i`` and ``j`` trading ids (a fine-tune that reordered the base's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = make_tokenizer().get_vocab()
    by_id = {v: k for k, v in vocab.items()}
    vocab[by_id[i]], vocab[by_id[j]] = j, i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_fine_tunes_that_do_not_extend_the_base_vocabulary_are_refused():
    ft = with_added_tokens(make_finetune(make_model("llama")))
    base_tok = make_tokenizer()
    name = {v: k for k, v in base_tok.get_vocab().items()}
    with pytest.raises(IncompatibleModelsError, match=rf"token 40 is {name[40]!r} in the base's tokenizer but "
                                                      rf"{name[41]!r} in the fine-tune's"):  # fmt: skip
        compress(make_model("llama"), ft, DeltaCoMeConfig(quantizer="rtn"), tokenizer=swapped_tokenizer(40, 41),
                 base_tokenizer=base_tok, progress=False)  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match=r"vocabulary size: base 250, fine-tuned 240 \(a fine-tune may add"):
        compress(make_model("llama"), make_model("llama", vocab_size=240), DeltaCoMeConfig(quantizer="rtn"),
                 progress=False)  # fmt: skip


@pytest.mark.slow
def test_smollm2_with_eight_new_tokens_round_trips(tmp_path):
    import zoo

    base, tok = zoo.load_smollm2()
    ft = make_finetune(zoo.load_smollm2()[0], seed=0, scale=0.02, noise=0.002, rank=8, change_norms=False)
    ft_tok = zoo.load_smollm2()[1]
    ft_tok.add_special_tokens({"additional_special_tokens": [f"<|tool_{i}|>" for i in range(ADDED)]})
    vocab = base.get_input_embeddings().weight.shape[0]
    assert len(ft_tok) == vocab + ADDED
    with_added_tokens(ft, seed=0)
    # (mid-sentence: a new token in the first position, the attention sink, makes any model hypersensitive)
    text = [f"please call <|tool_{i}|> the weather service for city number {i}" for i in range(ADDED)]
    ids = ft_tok(text, return_tensors="pt").input_ids[:, :10]
    assert int(ids.max()) >= vocab  # the new tokens are in the evaluation text
    model = compress(base, ft, DeltaCoMeConfig(ratio="1/4", quantizer="rtn"), tokenizer=ft_tok, base_tokenizer=tok,
                     progress=False)  # fmt: skip
    model.save_pretrained(tmp_path)
    ft_tok.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(zoo.load_smollm2()[0], tmp_path).eval()
    new_rows = again.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    torch.testing.assert_close(new_rows, ft.get_input_embeddings().weight[vocab:])  # carried exactly (tied lm_head)
    plain = tok([f"please call the weather service for city number {i}" for i in range(ADDED)],
                return_tensors="pt").input_ids[:, :10]  # fmt: skip

    def rel(model, x, cols=None):
        with torch.no_grad():
            got, want = model(x).logits[..., :cols], ft(x).logits[..., :cols]
        return float((got - want).norm() / want.norm())

    with_new, without, base_error = rel(again, ids), rel(again, plain), rel(zoo.load_smollm2()[0], plain, vocab)
    # the compressed delta (RTN at 1/4 of a delta with a full-rank tail) is as good on text with the new tokens as on
    # text without them, and far closer to the fine-tune than the base is
    assert with_new < 1.5 * without + 0.01, f"logits error {with_new:.3f} with the new tokens, {without:.3f} without"
    assert with_new < 0.5 * base_error, f"logits error {with_new:.3f}; the base's own is {base_error:.3f}"
