"""The offline tiny model is what every engine and mesh test serves, so its
files must be valid, deterministic and in the exact layouts vLLM expects.

No vLLM engine starts here: the quantized layouts are checked by unpacking the
saved tensors independently of spotmesh's packing code.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoTokenizer

from cli import tinymodel
from spotmesh import home

# vLLM undoes AutoAWQ's nibble order with this permutation
# (vllm/model_executor/layers/quantization/auto_awq.py: _REVERSE_AWQ_PACK_ORDER).
VLLM_REVERSE_AWQ_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
# vLLM 0.32's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {q: tinymodel.make_tiny(root / str(q), quantization=q) for q in tinymodel.QUANTIZATIONS}


@pytest.fixture(scope="module")
def hf_tokenizer(models: dict[str | None, Path]):
    return AutoTokenizer.from_pretrained(str(models[None]))


@cache
def _raw_tokenizer():
    return tinymodel.build_tokenizer()


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AutoAWQ order -> uint4 values [rows, cols]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles[:, :, VLLM_REVERSE_AWQ_ORDER].reshape(packed.shape[0], -1)


@pytest.mark.parametrize("quantization", tinymodel.QUANTIZATIONS)
def test_same_seed_writes_identical_files(tmp_path: Path, quantization: str | None) -> None:
    first = tinymodel.make_tiny(tmp_path / "a", quantization=quantization, seed=3)
    # Retrain the tokenizer too: the BPE trainer's hash maps are reseeded
    # per instance, so this catches order-dependent merges.
    tinymodel._tokenizer_json.cache_clear()
    tinymodel.greedy_excluded_token_ids.cache_clear()
    second = tinymodel.make_tiny(tmp_path / "b", quantization=quantization, seed=3)
    assert _files(first) == _files(second)
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        tinymodel.MARKER_FILE,
    }
    assert set(_files(first)) == expected


def test_different_seed_changes_weights_not_tokenizer(tmp_path: Path) -> None:
    a = tinymodel.make_tiny(tmp_path / "a", seed=0)
    b = tinymodel.make_tiny(tmp_path / "b", seed=1)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert not torch.equal(wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])


def test_config_fits_vllm_cpu_kernels(models: dict[str | None, Path]) -> None:
    cfg = json.loads((models[None] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["max_position_embeddings"] == 2048
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg["head_dim"] == head_dim
    assert head_dim in VLLM_CPU_HEAD_SIZES
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    # CPU WNA16 kernel: every (merged) linear in/out size a multiple of 32;
    # AWQ groups must tile the input dim.
    for out_f, in_f in tinymodel._linear_shapes().values():
        assert out_f % 32 == 0 and in_f % 32 == 0
        assert in_f % tinymodel.AWQ_GROUP_SIZE == 0
    tok = json.loads((models[None] / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == cfg["vocab_size"]


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_text(text: str) -> None:
    # A literal "<|end|>" in user text is the special token by design.
    assume(not any(token in text for token in tinymodel.SPECIAL_TOKENS))
    tok = _raw_tokenizer()
    ids = tok.encode(text).ids
    assert ids[0] == tinymodel.SPECIAL_TOKENS.index(tinymodel.BOS_TOKEN)
    assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "  leading and trailing spaces  \n\ttabs\r\n",
        "naïve café, Straße, jalapeño",
        "你好，世界！机器学习",  # noqa: RUF001
        "こんにちは 안녕하세요 Привет שלום مرحبا",
        "emoji 😀🚀 zwj 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽 variation ❤️",
        "never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x01\x7f \u200b\ufeff",  # noqa: RUF001
    ],
)
def test_tokenizer_round_trips_unicode_bytes(hf_tokenizer, text: str) -> None:
    ids = hf_tokenizer.encode(text)
    assert ids[0] == hf_tokenizer.bos_token_id
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_has_special_tokens(hf_tokenizer) -> None:
    assert len(hf_tokenizer) == tinymodel.VOCAB_SIZE
    assert hf_tokenizer.pad_token_id == 0
    assert hf_tokenizer.bos_token_id == 1
    assert hf_tokenizer.eos_token_id == 2
    for token in tinymodel.SPECIAL_TOKENS:
        # Each marker must be one id, not spelled out of "<", "|", ...
        assert len(hf_tokenizer.encode(token, add_special_tokens=False)) == 1
        assert token in hf_tokenizer.all_special_tokens


def test_chat_template_renders_roles_and_generation_prompt(hf_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "Again?"},
    ]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi 😀<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n<|user|>\nAgain?<|end|>\n"
    )
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered + "<|assistant|>\n"
    ids = hf_tokenizer.encode(prompt, add_special_tokens=False)
    assert ids.count(hf_tokenizer.bos_token_id) == 1
    assert ids[-2] == hf_tokenizer.convert_tokens_to_ids(tinymodel.ASSISTANT_TOKEN)
    with pytest.raises(Exception, match="Unsupported chat role"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_template_lives_in_tokenizer_config(models: dict[str | None, Path]) -> None:
    cfg = json.loads((models[None] / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tinymodel.CHAT_TEMPLATE
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_generation_stops_on_eos_and_end_of_turn(models: dict[str | None, Path]) -> None:
    gen = json.loads((models[None] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 6]


def test_greedy_never_picks_special_or_partial_utf8_tokens(
    models: dict[str | None, Path],
) -> None:
    lm_head = load_file(models[None] / "model.safetensors")["lm_head.weight"]
    excluded = tinymodel.greedy_excluded_token_ids()
    assert set(range(len(tinymodel.SPECIAL_TOKENS))) <= excluded
    tok = tinymodel.build_tokenizer()
    for idx in range(tinymodel.VOCAB_SIZE):
        zero_row = not lm_head[idx].any()
        assert zero_row == (idx in excluded), idx
        if not zero_row:
            text = tok.decode([idx])
            assert text and "\ufffd" not in text, idx
    # Enough real tokens remain for varied output.
    assert len(excluded) < tinymodel.VOCAB_SIZE // 4


def test_awq_pack_uses_autoawq_interleaved_order() -> None:
    # Columns 0..7 hold 0..7; AutoAWQ puts column order_map[i] in nibble i.
    packed = tinymodel.awq_pack_int4(torch.arange(8).reshape(1, 8))
    assert packed.dtype == torch.int32
    assert packed.item() == 0x75316420
    # Nibble 7 set means a negative int32, which must not overflow.
    top = tinymodel.awq_pack_int4(torch.full((1, 8), 15))
    assert top.item() == -1


def test_awq_packing_dequantizes_close_to_fp_weights(models: dict[str | None, Path]) -> None:
    fp = load_file(models[None] / "model.safetensors")
    awq = load_file(models["awq"] / "model.safetensors")
    cfg = json.loads((models["awq"] / "config.json").read_text())["quantization_config"]
    assert cfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": tinymodel.AWQ_GROUP_SIZE,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    group = cfg["group_size"]
    for name in tinymodel.linear_weight_names():
        base = name.removesuffix(".weight")
        assert name not in awq
        qweight, qzeros, scales = (awq[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales"))
        w = fp[name].float()  # [out, in]
        out_f, in_f = w.shape
        assert qweight.dtype == qzeros.dtype == torch.int32
        assert qweight.shape == (in_f, out_f // 8)
        assert qzeros.shape == (in_f // group, out_f // 8)
        assert scales.shape == (in_f // group, out_f)
        q = _unpack_awq(qweight).float()
        z = _unpack_awq(qzeros).float().repeat_interleave(group, dim=0)
        s = scales.float().repeat_interleave(group, dim=0)
        deq = ((q - z) * s).t()
        # Round-to-nearest: within half a step; the bf16-rounded scale can push
        # a group's extreme just past the 0..15 range, hence the small margin.
        assert ((deq - w).abs() <= 0.6 * s.t()).all(), name
        assert (deq - w).norm() / w.norm() < 0.12, name
    # Embeddings, norms and lm_head stay unquantized and identical to fp.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(awq[name], fp[name])
        assert awq[name].dtype == torch.bfloat16


def test_w8a8_checkpoint_has_compressed_tensors_config(models: dict[str | None, Path]) -> None:
    cfg = json.loads((models["w8a8"] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["format"] == "int-quantized"
    assert cfg["ignore"] == ["lm_head"]
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    w_args, a_args = group["weights"], group["input_activations"]
    assert (w_args["num_bits"], w_args["type"], w_args["strategy"]) == (8, "int", "channel")
    assert w_args["symmetric"] and not w_args["dynamic"]
    assert (a_args["num_bits"], a_args["type"], a_args["strategy"]) == (8, "int", "token")
    assert a_args["symmetric"] and a_args["dynamic"]
    # The schema vLLM itself parses the config with.
    ct = pytest.importorskip("compressed_tensors.quantization")
    parsed = ct.QuantizationConfig.model_validate(cfg)
    assert parsed.config_groups["group_0"].weights.strategy == "channel"


def test_w8a8_weights_are_int8_per_channel(models: dict[str | None, Path]) -> None:
    fp = load_file(models[None] / "model.safetensors")
    w8 = load_file(models["w8a8"] / "model.safetensors")
    for name in tinymodel.linear_weight_names():
        base = name.removesuffix(".weight")
        q, scale = w8[name], w8[f"{base}.weight_scale"]
        w = fp[name].float()
        assert q.dtype == torch.int8 and q.shape == w.shape
        assert scale.shape == (w.shape[0], 1)
        assert q.abs().max() <= 127
        assert (q.float() * scale.float() - w).norm() / w.norm() < 0.02, name
    assert "lm_head.weight_scale" not in w8
    assert w8["lm_head.weight"].dtype == torch.bfloat16


def test_existing_complete_model_is_not_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tinymodel.make_tiny(tmp_path / "m", quantization="awq", seed=5)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("complete model was rebuilt")

    monkeypatch.setattr(tinymodel, "_write_model", fail)
    assert tinymodel.make_tiny(out, quantization="awq", seed=5) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_other_variant_or_seed_replaces_our_model(tmp_path: Path) -> None:
    out = tinymodel.make_tiny(tmp_path / "m", seed=0)
    tinymodel.make_tiny(out, quantization="w8a8", seed=2)
    assert tinymodel.read_marker(out)["variant"] == "w8a8"
    assert tinymodel.is_complete_model(out, quantization="w8a8", seed=2)
    assert not tinymodel.is_complete_model(out, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or trash left


def test_damaged_model_is_rebuilt(tmp_path: Path) -> None:
    out = tinymodel.make_tiny(tmp_path / "m")
    good = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(good[: len(good) // 2])
    assert not tinymodel.is_complete_model(out)
    tinymodel.make_tiny(out)
    assert (out / "model.safetensors").read_bytes() == good


def test_crash_mid_write_leaves_no_partial_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(out: Path) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tinymodel, "_save_tokenizer", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tinymodel.make_tiny(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unrelated_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tinymodel.make_tiny(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_quantization_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported quantization"):
        tinymodel.make_tiny(tmp_path / "m", quantization="fp8")


def test_default_model_dir_honours_spotmesh_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPOTMESH_HOME", str(tmp_path))
    assert home.default_model_dir() == tmp_path / "models" / "spotmesh-tiny"
    assert home.default_model_dir("awq") == tmp_path / "models" / "spotmesh-tiny-awq"
    monkeypatch.delenv("SPOTMESH_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "spotmesh" / "models" / "spotmesh-tiny-w8a8"
    assert home.default_model_dir("w8a8") == expected


def test_ensure_default_model_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTMESH_HOME", str(tmp_path))
    with pytest.raises(home.DefaultModelMissing, match="spotmesh model make-tiny"):
        home.built_default_model()
    path = tinymodel.ensure_default_model()
    assert path == home.default_model_dir() == home.built_default_model()
    assert tinymodel.is_complete_model(path)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tinymodel.ensure_default_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
