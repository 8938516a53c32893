"""``windtunnel inspect`` on local Hugging Face model directories written by save_pretrained.

References are independent of the instrument: attention entropies from the model's own eager
attention weights (``output_attentions=True``), GPT-2's layer-0 keys rebuilt by hand from
``wte + wpe``, ``ln_1`` and ``c_attn`` with a loop over position pairs, the loss from the model's
logits. Refusals: pickled weights (with a payload that would leave a file if it ever ran), no
tokenizer, no config, truncated or partial safetensors, text that is not UTF-8; markup in the directory name is escaped.
"""

import json
import math
import pickle

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from windtunnel.cli import main  # noqa: E402
from windtunnel.experiments.inspection import inspect_model_dir, inspect_tokens  # noqa: E402

WORDS = "the cat sat on mat a dog ran to and".split()
TEXT = "the cat sat on the mat and a dog ran to the cat " * 3


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _model(arch):
    common = dict(vocab_size=len(WORDS) + 1, initializer_range=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "gpt2":
            config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                             attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **common)
            return transformers.GPT2LMHeadModel(config)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64, **common)
        return transformers.LlamaForCausalLM(config)


def _save(tmp_path, arch, name=None):
    folder = tmp_path / (name or arch)
    _model(arch).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_inspect_against_the_models_own_attention_and_loss(tmp_path, text_file, arch):
    folder = _save(tmp_path, arch)
    result = inspect_model_dir(folder, text_file, out=tmp_path / "out")
    ids = _tokenizer()(TEXT, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    assert result["n_tokens"] == result["n_text_tokens"] == n and result["model_type"] == arch
    assert json.loads((tmp_path / "out" / "inspect.json").read_text())["heads"] == result["heads"]
    assert "<h1>windtunnel inspect" in (tmp_path / "out" / "inspect.html").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert result["loss_nats"] == pytest.approx(float(loss), rel=1e-5)
    for layer, weights in enumerate(out.attentions):  # [1, head, T, T]
        a = weights[0, :, 1:].double()
        entropy = -(a * torch.log2(a.clamp_min(1e-300))).sum(-1).mean(-1)  # rows 1..T-1, [head]
        got = [h["attn_entropy_bits"] for h in result["heads"] if h["layer"] == layer]
        assert got == pytest.approx(entropy.tolist(), abs=1e-5)
    for row in result["layers"]:
        assert row["law_check_rel_error"] < 1e-10 and row["model_grad_rel_error"] < 1e-4
        assert row["n_kv_heads"] == (2 if arch == "llama" else 4)
    assert {h["kv_head"] for h in result["heads"] if h["layer"] == 0} == ({0, 1} if arch == "llama" else {0, 1, 2, 3})
    assert all(h["advantage_abs_mean"] > 0 and 1.0 <= h["key_participation_ratio"] <= 8.0 for h in result["heads"])


def test_gpt2_layer0_key_geometry_against_keys_rebuilt_by_hand(tmp_path, text_file):
    folder = _save(tmp_path, "gpt2")
    result = inspect_model_dir(folder, text_file, out=tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _tokenizer()(TEXT, return_tensors="pt")["input_ids"][0]
    t = model.transformer
    with torch.no_grad():
        x = t.h[0].ln_1(t.wte(ids) + t.wpe(torch.arange(len(ids))))
        keys = (x @ t.h[0].attn.c_attn.weight + t.h[0].attn.c_attn.bias)[:, 32:64].view(len(ids), 4, 8).double()
    for head in range(4):
        k = keys[:, head]
        cosines = [abs(float(torch.nn.functional.cosine_similarity(k[i], k[j], dim=0)))
                   for i in range(len(ids)) for j in range(len(ids)) if i != j]
        row = next(h for h in result["heads"] if h["layer"] == 0 and h["head"] == head)
        assert row["key_abs_cos"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
        assert row["key_norm_mean"] == pytest.approx(float(k.norm(dim=-1).mean()), rel=1e-5)
    assert result["key_random_abs_cos"] == pytest.approx(math.gamma(4) / (math.sqrt(math.pi) * math.gamma(4.5)))


def test_the_command_line_truncates_and_writes_json_and_html(tmp_path, text_file):
    folder = _save(tmp_path, "llama")
    run = CliRunner().invoke(main, ["inspect", str(folder), "--text", str(text_file), "--max-tokens", "10",
                                    "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert "10 tokens of 39" in run.output and "focusing ratio" in run.output
    assert json.loads((tmp_path / "out" / "inspect.json").read_text())["n_tokens"] == 10


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_missing_tokenizer_and_bad_text_are_refused(tmp_path, text_file):
    pickled = tmp_path / "pickled"
    _model("gpt2").save_pretrained(pickled)
    _tokenizer().save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    refused = CliRunner().invoke(main, ["inspect", str(pickled), "--text", str(text_file), "--out", str(tmp_path / "o")])
    assert refused.exit_code == 2 and "holds no *.safetensors weights" in refused.output
    assert "pytorch_model.bin: pickled weights" in refused.output and not marker.exists()
    no_tokenizer = tmp_path / "bare"
    _model("gpt2").save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match=r"bare has no (usable )?tokenizer"):
        inspect_model_dir(no_tokenizer, text_file, out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"has no config.json"):
        inspect_model_dir(tmp_path, text_file, out=tmp_path / "o")
    truncated = _save(tmp_path, "llama", name="truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"truncated \(model.safetensors\): the weights could not be read"):
        inspect_model_dir(truncated, text_file, out=tmp_path / "o")
    partial = _save(tmp_path, "llama", name="partial")
    from safetensors.torch import load_file, save_file

    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold exactly the model's weights \(missing keys: model.layers.0.mlp.down_proj.weight\)"):
        inspect_model_dir(partial, text_file, out=tmp_path / "o")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match=r"binary.txt must be UTF-8 text"):
        inspect_model_dir(_save(tmp_path, "gpt2"), binary, out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"at least 3 tokens long"):
        inspect_tokens(_model("gpt2"), torch.tensor([[1, 2]]))
    assert not (tmp_path / "o").exists()  # nothing written for a refused input


def test_markup_in_the_directory_name_is_escaped(tmp_path, text_file):
    folder = _save(tmp_path, "gpt2", name="<script>alert(1)</script>")
    inspect_model_dir(folder, text_file, out=tmp_path / "out")
    page = (tmp_path / "out" / "inspect.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
