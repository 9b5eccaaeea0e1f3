"""Build a tiny, random-weight Llama checkpoint that vLLM can serve offline.

Why this exists: spotmesh must be tested end to end (gRPC mesh -> vLLM
engine -> tokens) on machines that have no network and no GPU, so no real
model can be downloaded. Instead we *make* one: a real LlamaForCausalLM in
Hugging Face format with seeded random weights and a real byte-level BPE
tokenizer trained here on text embedded in this module. Its output is
gibberish, but every code path that touches a real model (config parsing,
tokenizer and chat-template handling, weight loading, quantized kernels,
detokenization of arbitrary bytes) is exercised for real.

Three variants are produced from the same seeded fp weights:

* ``None``   - plain bf16 weights.
* ``"awq"``  - AutoAWQ 4-bit GEMM layout, packed by plain round-to-nearest
  (no calibration data exists offline; RTN is what AWQ degenerates to with
  unit activation scales).
* ``"w8a8"`` - compressed-tensors INT8 weights (per-channel, symmetric) with
  dynamic per-token INT8 activations, the scheme vLLM maps to
  ``CompressedTensorsW8A8Int8``.

Output is byte-for-byte deterministic for a given (variant, seed) so caches,
content hashes and CI are stable, and it is written atomically so a crash
never leaves a half model where a loader would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotmesh.files import publish_directory
from spotmesh.home import (
    DEFAULT_MODEL_NAME,
    TINY_MODEL_MARKER,
    TINY_MODEL_VARIANTS,
    default_model_dir,
    tiny_variant,
)

if TYPE_CHECKING:  # heavy imports stay lazy: default_model_dir() must be cheap
    import torch
    from tokenizers import Tokenizer

# Bump whenever the bytes make_tiny() writes change, so caches rebuild.
FORMAT_VERSION = 1
MARKER_FILE = TINY_MODEL_MARKER
QUANTIZATIONS = TINY_MODEL_VARIANTS

# Dimensions. Every linear in/out size is a multiple of 64: vLLM's CPU WNA16
# (AWQ) kernel needs multiples of 32, AWQ packs 8 output columns per int32 and
# quantizes the input dim in groups of AWQ_GROUP_SIZE. head_dim 64 is in vLLM's
# CPU attention list (32, 64, 80, ...). Two KV heads for four query heads so
# the GQA path is exercised too. Embeddings and lm_head are not tied, so the
# quantized variants keep a distinct unquantized lm_head, as real ones do.
VOCAB_SIZE = 2048
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITION_EMBEDDINGS = 2048
INIT_STD = 0.02
AWQ_BITS = 4
AWQ_GROUP_SIZE = 64
AWQ_PACK_FACTOR = 32 // AWQ_BITS
# AutoAWQ's WQLinear_GEMM stores output column order_map[i] in nibble i.
AWQ_ORDER_MAP = (0, 2, 4, 6, 1, 3, 5, 7)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
# Order fixes the ids: pad=0, bos=1, eos=2, roles 3..5, end-of-turn 6.
SPECIAL_TOKENS = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_TOKEN,
)

# Each turn is "<|role|>\ncontent<|end|>\n". Unknown roles fail loudly rather
# than silently rendering a prompt the model was never "trained" on. Content
# may be a string or a list of OpenAI-style text parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Training text for the tokenizer. It lives here, not in a data file, so the
# vocabulary (and thus tokenizer.json) is identical on every machine. It mixes
# prose, code, JSON, numbers and non-Latin scripts so common merges exist for
# the kinds of prompts tests send; anything else still round-trips through
# the 256 byte-level base tokens.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Hello world! Hello, world. Hello there, how are you today? I am fine, thank you.
Once upon a time there was a small model that lived inside a test suite. It knew
very little about the world, but it always answered quickly and never complained.
Every morning it woke up, loaded its weights, and waited for the first request.
A service mesh routes requests between many small programs. Each program does one
thing well: a router picks a replica, a replica runs the model, and a scheduler
decides which machine should host which replica. When a spot instance is taken
away, the mesh must notice, drain the requests, and move the work elsewhere.
Large language models generate text one token at a time. The prompt is split into
tokens by a tokenizer, the tokens are turned into vectors, and the network predicts
the next token. Sampling with temperature zero always picks the most likely token,
which is called greedy decoding. Top-k and top-p sampling add controlled randomness.
The server streams tokens back to the client as soon as they are ready, so the user
sees the answer appear word by word instead of waiting for the whole response.
Latency is the time to the first token; throughput is how many tokens per second the
whole system produces. Batching many requests together raises throughput, while a
long queue raises latency. Good schedulers balance both and respect deadlines.
Health checks report whether a node is ready, serving, draining, or dead. A node that
misses three heartbeats in a row is marked unhealthy and removed from the pool.
Retries use exponential backoff with jitter so that a failing node is not flooded.
Timeouts, cancellations and deadlines propagate through every call in the chain.
Quantization stores weights with fewer bits. Four-bit weights with group scales and
zero points shrink a model by about four times; eight-bit weights with per-channel
scales keep more accuracy. Activations can be quantized dynamically per token.
The cache keeps keys and values for every layer so that earlier tokens are not
recomputed. Paged attention splits that cache into fixed-size blocks, like pages
of virtual memory, and a block table maps logical positions to physical blocks.
In the spring the river rises and the fields turn green. Farmers plant wheat, corn,
beans and potatoes. In summer the days are long and warm; in autumn the leaves turn
red, orange and yellow; in winter snow covers the mountains and the lakes freeze.
The library opens at nine in the morning and closes at six in the evening. Students
read books about history, mathematics, physics, chemistry, biology and music.
My favourite colours are blue, green, purple and gold. The cat sleeps on the warm
window sill while the dog chases a ball across the garden. Birds sing in the trees.
She said: "Please write a short poem about the sea." He replied, "The sea is wide,
the sea is deep, it sings the sailors off to sleep."
Question: What is the capital of France? Answer: Paris.
Question: What is two plus two? Answer: Four.
Question: Which planet is closest to the sun? Answer: Mercury.
Summarize the following paragraph in one sentence. Translate this text into French.
Explain the difference between a process and a thread. List three reasons why tests
should be fast, deterministic and independent of the network.
You are a helpful assistant. Answer the user's question honestly and concisely.
If you do not know the answer, say so. Do not make things up.
import json
import os
from pathlib import Path


def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class Router:
    def __init__(self, replicas: list[str]) -> None:
        self.replicas = replicas
        self.index = 0

    def pick(self) -> str:
        replica = self.replicas[self.index % len(self.replicas)]
        self.index += 1
        return replica


for i in range(10):
    print(f"step {i}: loss={0.5 / (i + 1):.4f}")
if __name__ == "__main__":
    raise SystemExit(main())
{"model": "spotmesh-tiny", "prompt": "Hello", "max_tokens": 16, "temperature": 0.0}
{"id": "req-0001", "status": "ok", "tokens": [1, 2, 3], "finish_reason": "length"}
{"node": "worker-3", "state": "draining", "gpu_memory_gb": 80, "queue_depth": 12}
GET /v1/models HTTP/1.1
POST /v1/chat/completions HTTP/1.1
Content-Type: application/json
2024-05-17T12:34:56Z INFO request finished in 0.123 seconds with 42 tokens
2024-05-17T12:34:57Z WARN node worker-7 missed heartbeat; retrying in 250 ms
2024-05-17T12:34:58Z ERROR upstream connect error or disconnect/reset before headers
Les modèles de langage génèrent du texte. Der schnelle braune Fuchs springt über
den faulen Hund. El rápido zorro marrón salta sobre el perro perezoso. Ça va très
bien, merci. Größe, Straße, naïve café, façade, coöperate, smörgåsbord, jalapeño.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, мир!
Γεια σου κόσμε. Καλημέρα. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया।
你好，世界！今天天气很好。我们一起去公园散步吧。机器学习和语言模型。
こんにちは、世界。今日はいい天気ですね。東京は日本の首都です。
안녕하세요, 세계. 오늘 날씨가 좋네요.
Emoji: 😀 😂 🚀 🔥 ✨ 👍 🎉 ❤️ 🌍 🤖 🐍 ☕ and flags like 🇫🇷 🇯🇵.
Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ± × ÷ π θ λ μ σ Ω → ← ↑ ↓ ∀ ∃ ∈ ∉ ∅.
Symbols: @ # $ % ^ & * ( ) [ ] { } < > / \\ | ~ ` ' " ; : , . ? ! - _ + =
"""  # noqa: RUF001

# Word lists for deterministic extra sentences: the embedded prose alone does
# not hold enough distinct pairs for the BPE trainer to reach VOCAB_SIZE, and
# a short vocabulary would leave embedding rows the tokenizer cannot decode.
_SUBJECTS = (
    "the router, a replica, the scheduler, every worker, the client, our cluster, the gateway, "
    "each node, the model, a request, the operator, this service, the balancer, a tenant, "
    "the engine"
).split(", ")
_VERBS = (
    "sends receives retries cancels streams drains restarts measures rejects accepts forwards "
    "schedules records compresses validates observes generates tokenizes"
).split()
_OBJECTS = (
    "the prompt, a heartbeat, three tokens, every batch, the deadline, its metrics, the weights, "
    "a snapshot, the response, new capacity, the queue, old replicas, a checkpoint, the budget, "
    "many requests"
).split(", ")
_ADVERBS = (
    "quickly slowly carefully eventually immediately quietly reliably twice again locally "
    "remotely safely"
).split()


def _corpus_lines() -> list[str]:
    lines = _CORPUS.splitlines()
    n = 0
    for s in _SUBJECTS:
        for v in _VERBS:
            # A fixed stride through objects/adverbs gives variety without
            # the full cartesian product (which would dominate the counts).
            o = _OBJECTS[n % len(_OBJECTS)]
            a = _ADVERBS[(n * 7) % len(_ADVERBS)]
            lines.append(f"{s.capitalize()} {v} {o} {a}.")
            n += 1
    # Numbers, so ids, ports and counts tokenize into a few pieces.
    lines.extend(" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 1000, 50))
    lines.extend(f"port {8000 + i} replica-{i:02d} 10.0.{i}.{i * 3 % 256}" for i in range(64))
    return lines


def ensure_default_model(quantization: str | None = None) -> Path:
    """Return the default tiny model's directory, building it on first use."""
    return make_tiny(default_model_dir(quantization), quantization=quantization)


def make_tiny(out_dir: str | Path, *, quantization: str | None = None, seed: int = 0) -> Path:
    """Write a tiny random Llama checkpoint to ``out_dir`` and return its path.

    Returns at once if ``out_dir`` already holds a complete model of the same
    variant, seed and format version. A directory holding anything else that
    is not one of our models is refused rather than overwritten.
    """
    variant = tiny_variant(quantization)
    out = Path(out_dir).expanduser().absolute()
    if is_complete_model(out, quantization=quantization, seed=seed):
        return out
    if out.exists() and not (out / MARKER_FILE).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and does not hold a spotmesh tiny model")

    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent => same filesystem => the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable
        _write_model(tmp, variant, seed)
        publish_directory(
            tmp, out, lambda d: is_complete_model(d, quantization=quantization, seed=seed)
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_marker(model_dir: str | Path) -> dict[str, Any] | None:
    """The marker make_tiny() writes last, or None if absent or unreadable."""
    try:
        return json.loads((Path(model_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete_model(
    model_dir: str | Path, *, quantization: str | None = None, seed: int = 0
) -> bool:
    """Whether ``model_dir`` holds a finished model of this variant and seed."""
    marker = read_marker(model_dir)
    if not marker or marker.get("version") != FORMAT_VERSION:
        return False
    if marker.get("variant") != tiny_variant(quantization) or marker.get("seed") != seed:
        return False
    # Sizes are a cheap guard against files damaged after publication.
    for name, size in marker.get("files", {}).items():
        path = Path(model_dir) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(marker.get("files"))


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    # Cached as JSON text: the trained object is mutable, the text is not.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        # Ids past the tokenizer's vocab would be undecodable if sampled.
        raise RuntimeError(
            f"tokenizer trained to {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}"
        )
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Llama convention: plain encode() prepends BOS; the chat template writes
    # its own BOS and is encoded without special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok.to_str()


def build_tokenizer() -> Tokenizer:
    """The trained byte-level BPE tokenizer (a fresh ``tokenizers`` object)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


def _save_tokenizer(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json,
    # which every loader (old transformers, vLLM, TGI) understands.
    hf_tok.save_pretrained(str(out), save_jinja_files=False)
    # transformers 5 records its own class and key names; rewrite them to the
    # spelling transformers 4 also reads (5 maps both back), so older vLLM
    # images can load the same directory.
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in cfg:
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    path.write_text(
        json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


# --------------------------------------------------------------------------
# Weights


def _linear_shapes() -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear inside one decoder layer."""
    q_out = NUM_HEADS * HEAD_DIM
    kv_out = NUM_KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj": (q_out, HIDDEN_SIZE),
        "self_attn.k_proj": (kv_out, HIDDEN_SIZE),
        "self_attn.v_proj": (kv_out, HIDDEN_SIZE),
        "self_attn.o_proj": (HIDDEN_SIZE, q_out),
        "mlp.gate_proj": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
        "mlp.up_proj": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
        "mlp.down_proj": (HIDDEN_SIZE, INTERMEDIATE_SIZE),
    }


def linear_weight_names() -> list[str]:
    """HF names of the weights that the quantized variants quantize."""
    return [
        f"model.layers.{i}.{name}.weight" for i in range(NUM_LAYERS) for name in _linear_shapes()
    ]


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The fp checkpoint for ``seed`` (bf16), shared by every variant."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        # Drawn in fp32 then rounded, so values do not depend on bf16 RNG paths.
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD).to(
            torch.bfloat16
        )

    ones = lambda: torch.ones(HIDDEN_SIZE, dtype=torch.bfloat16)  # noqa: E731
    # Insertion order fixes the RNG draw order; do not reorder.
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(VOCAB_SIZE, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        prefix = f"model.layers.{i}."
        sd[prefix + "input_layernorm.weight"] = ones()
        sd[prefix + "post_attention_layernorm.weight"] = ones()
        for name, shape in _linear_shapes().items():
            sd[prefix + name + ".weight"] = normal(*shape)
    sd["model.norm.weight"] = ones()
    lm_head = normal(VOCAB_SIZE, HIDDEN_SIZE)
    # A zero row gives logit 0, below the max of ~2000 random logits, so
    # greedy decoding never picks these tokens: output never stops early on a
    # special token and always decodes to whole, printable UTF-8 (a lone byte
    # token would otherwise render as "" or U+FFFD). Sampling can still pick
    # them, as it can with a real model.
    lm_head[list(greedy_excluded_token_ids())] = 0
    sd["lm_head.weight"] = lm_head
    return sd


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte <-> printable-unicode table, which ByteLevel uses.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in table.items()}


@lru_cache(maxsize=1)
def greedy_excluded_token_ids() -> frozenset[int]:
    """Ids whose lm_head row is zeroed: specials and tokens that are not
    whole printable UTF-8 on their own (see random_state_dict)."""
    decoder = _byte_decoder()
    excluded = set()
    vocab = build_tokenizer().get_vocab(with_added_tokens=True)
    for token, idx in vocab.items():
        if token in SPECIAL_TOKENS:
            excluded.add(idx)
            continue
        try:
            text = bytes(decoder[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            excluded.add(idx)
            continue
        if not (text.isprintable() or set(text) <= {" ", "\n", "\t"}):
            excluded.add(idx)
    return frozenset(excluded)


def awq_pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack uint4 values [rows, cols] into int32 [rows, cols // 8], AWQ order.

    Nibble i of each int32 holds column ``AWQ_ORDER_MAP[i]`` of its group of
    eight, exactly as AutoAWQ's WQLinear_GEMM.from_linear does; vLLM undoes
    that order with its _REVERSE_AWQ_PACK_ORDER.
    """
    import torch

    rows, cols = values.shape
    if cols % AWQ_PACK_FACTOR:
        raise ValueError(f"columns ({cols}) must be a multiple of {AWQ_PACK_FACTOR}")
    v = values.to(torch.int64).reshape(rows, cols // AWQ_PACK_FACTOR, AWQ_PACK_FACTOR)
    v = v[:, :, list(AWQ_ORDER_MAP)]
    shifts = torch.arange(0, 32, AWQ_BITS, dtype=torch.int64)
    packed = (v << shifts).sum(dim=-1)
    # int64 -> wrap to int32's two's complement (nibble 7 reaches bit 31).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def awq_quantize(
    weight: torch.Tensor, group_size: int = AWQ_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit AWQ of a [out, in] weight.

    Returns (qweight int32 [in, out/8], qzeros int32 [in/g, out/8],
    scales bf16 [in/g, out]), AutoAWQ GEMM layout. Dequantize with
    ``(q - z) * s`` per input group.
    """
    import torch

    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features ({in_f}) must be a multiple of group_size ({group_size})")
    qmax = 2**AWQ_BITS - 1
    w = weight.to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    w_max = w.amax(dim=-1, keepdim=True)
    w_min = w.amin(dim=-1, keepdim=True)
    scales = ((w_max - w_min).clamp(min=1e-5) / qmax).to(torch.bfloat16)
    # Quantize against the scales as stored, so dequantization by any reader
    # reproduces exactly the values we rounded to.
    s = scales.to(torch.float32)
    zeros = torch.clamp(torch.round(-w_min / s), 0, qmax)
    q = torch.clamp(torch.round(w / s) + zeros, 0, qmax)

    intweight = q.reshape(out_f, in_f).t().contiguous()  # [in, out]
    qweight = awq_pack_int4(intweight)
    qzeros = awq_pack_int4(zeros.squeeze(-1).t().contiguous())  # [in/g, out/8]
    return qweight, qzeros, scales.squeeze(-1).t().contiguous()


def w8a8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (weight int8 [out, in], scale [out, 1])."""
    import torch

    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0).to(torch.bfloat16)
    q = torch.clamp(torch.round(w / scale.to(torch.float32)), -127, 127).to(torch.int8)
    return q, scale


def _quantized_state_dict(sd: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    if variant == "fp":
        return sd
    linear = set(linear_weight_names())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name not in linear:
            out[name] = tensor
            continue
        base = name.removesuffix(".weight")
        if variant == "awq":
            qweight, qzeros, scales = awq_quantize(tensor)
            out[base + ".qweight"] = qweight
            out[base + ".qzeros"] = qzeros
            out[base + ".scales"] = scales
        else:
            qweight, scale = w8a8_quantize(tensor)
            out[base + ".weight"] = qweight
            out[base + ".weight_scale"] = scale
    return out


def _quantization_config(variant: str) -> dict[str, Any] | None:
    if variant == "awq":
        return {
            "quant_method": "awq",
            "bits": AWQ_BITS,
            "group_size": AWQ_GROUP_SIZE,
            "zero_point": True,
            "version": "gemm",
            # Unquantized modules are found from the safetensors dtypes.
            "modules_to_not_convert": None,
        }
    if variant == "w8a8":

        def args(strategy: str, dynamic: bool, observer: str | None) -> dict[str, Any]:
            return {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "group_size": None,
                "strategy": strategy,
                "block_structure": None,
                "dynamic": dynamic,
                "actorder": None,
                "scale_dtype": None,
                "zp_dtype": None,
                "observer": observer,
                "observer_kwargs": {},
            }

        # Shape of what llm-compressor's W8A8 preset writes; vLLM routes
        # int-quantized + channel weights + dynamic token inputs to
        # CompressedTensorsW8A8Int8.
        return {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": args("channel", False, "minmax"),
                    "input_activations": args("token", True, None),
                    "output_activations": None,
                    "format": "int-quantized",
                }
            },
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }
    return None


def _model_config(variant: str) -> dict[str, Any]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        dtype="bfloat16",
    ).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    qcfg = _quantization_config(variant)
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    return cfg


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_model(out: Path, variant: str, seed: int) -> None:
    from safetensors.torch import save_file

    sd = _quantized_state_dict(random_state_dict(seed), variant)
    save_file(
        {k: v.contiguous() for k, v in sd.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _write_json(out / "config.json", _model_config(variant))
    # Both end markers stop generation: <|eos|> for raw completions and
    # <|end|> for chat turns.
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
            "eos_token_id": [SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(END_TOKEN)],
            "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        },
    )
    _save_tokenizer(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    for name in files:
        os.chmod(out / name, 0o644)  # safetensors writes 0600; the cache is shared
    # The marker goes last: its presence is what "complete" means.
    _write_json(
        out / MARKER_FILE,
        {
            "name": DEFAULT_MODEL_NAME,
            "variant": variant,
            "seed": seed,
            "version": FORMAT_VERSION,
            "files": files,
        },
    )
