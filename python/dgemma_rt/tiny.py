"""The built-in tiny random DiffusionGemma checkpoint (numpy + tokenizers only).

`make_tiny(dir)` writes a complete Hugging Face checkpoint: config.json and generation_config.json in
the format transformers 5.23.0 writes them, model.safetensors with random float32 weights under the
names transformers uses, and a byte-level BPE tokenizer trained on a small built-in corpus. The same
seed gives the same bytes, so the checkpoint can be rebuilt anywhere instead of being shipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

# Bump when anything make_tiny writes changes, so cached copies (dgemma-bench) are rebuilt.
TINY_FORMAT_VERSION = 2

VOCAB_SIZE = 2048
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 6
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
GLOBAL_HEAD_DIM = 64
NUM_GLOBAL_KV_HEADS = 1
NUM_EXPERTS = 16
TOP_K_EXPERTS = 4
MOE_INTERMEDIATE_SIZE = 64
SLIDING_WINDOW = 128
CANVAS_LENGTH = 64  # the real model uses 256; 64 keeps a CPU canvas well under a second
MAX_POSITION_EMBEDDINGS = 8192
LAYER_TYPES = ["sliding_attention"] * (NUM_LAYERS - 1) + ["full_attention"]

@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes a DiffusionGemma config is made of (the tiny model's by default; dgemma_rt.presets has more)."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = HIDDEN_SIZE
    intermediate_size: int = INTERMEDIATE_SIZE
    layer_types: tuple[str, ...] = tuple(LAYER_TYPES)
    num_heads: int = NUM_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    head_dim: int = HEAD_DIM
    global_head_dim: int = GLOBAL_HEAD_DIM
    num_global_kv_heads: int = NUM_GLOBAL_KV_HEADS
    num_experts: int = NUM_EXPERTS
    top_k_experts: int = TOP_K_EXPERTS
    moe_intermediate_size: int = MOE_INTERMEDIATE_SIZE
    sliding_window: int = SLIDING_WINDOW
    canvas_length: int = CANVAS_LENGTH
    max_position_embeddings: int = MAX_POSITION_EMBEDDINGS

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)


TINY = ModelShape()


# Gemma-like special tokens; ids follow the list order. <end_of_turn> ends a chat turn, so it is an EOS id.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_OF_TURN_ID, END_OF_TURN_ID = range(len(SPECIAL_TOKENS))
EOS_IDS = [EOS_ID, END_OF_TURN_ID]

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Gemma's chat template, reduced to text content: a system message is folded into the first user turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = '' -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}\n"
    "    {%- endif -%}\n"
    "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
    "    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{- message['content'] | trim -}}\n"
    "    {%- else -%}\n"
    "        {%- for item in message['content'] if item['type'] == 'text' -%}\n"
    "            {{- item['text'] | trim -}}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {{- '<end_of_turn>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<start_of_turn>model\\n' -}}\n"
    "{%- endif -%}\n"
)

_CORPUS = """\
The sky is blue because the air scatters short waves of sunlight more than long ones. At noon the
light takes a short path through the air and the whole sky looks blue; at sunset the path is long,
most of the blue is scattered away, and the sun and the clouds turn orange and red.

A language model reads a sequence of tokens and predicts what comes next. A diffusion language model
works in a different way: it starts from a block of random tokens, the canvas, and improves the whole
block over a number of steps. At each step it keeps the tokens it is sure about and replaces the others
with fresh noise, until the canvas is stable and the model is confident. Then it writes the block to
its memory and starts on the next one.

Water boils at one hundred degrees Celsius at sea level, but at a lower temperature high in the
mountains, where the air pressure is lower. That is why cooking pasta takes longer in a mountain hut
than in a kitchen by the sea. Salt in the water raises the boiling point only a little.

Once upon a time there was a small village at the edge of a great forest. The people of the village
were farmers and they grew wheat, apples and potatoes. Every autumn they held a market in the square,
and travellers came from far away to buy bread, cheese and honey, to hear the news and to tell stories
about the cities, the rivers and the kings of the world beyond the hills.

To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves for each person, pour the
water and wait three to five minutes. Some people like milk and sugar; others drink it plain. Green tea
wants cooler water than black tea, and it turns bitter when it steeps for too long.

Computers store numbers in binary. A byte holds eight bits and can take two hundred and fifty six
values. Floating point numbers keep a sign, an exponent and a fraction, so they can describe very large
and very small values, but they round the results of most operations. Programs that add many small
numbers should therefore sum them with care, for example in pairs or with a wider type.

The museum opened its new gallery on Monday. Visitors walked past ancient pottery, bronze helmets,
painted masks and a huge skeleton of a whale hanging from the ceiling. Children pressed their noses
against the glass cases while their parents read the labels aloud. A guide explained how archaeologists
date objects by measuring carbon, studying layers of soil and comparing the shapes of broken jars.

Good software is written twice: once to understand the problem and once to solve it well. Engineers
profile their programs before optimizing them, because intuition about performance is often wrong.
Memory bandwidth, cache misses, branch prediction and vector instructions decide how fast a loop runs,
and a kernel that reads every weight exactly once can approach the limits of the hardware.

Spring arrived early that year. Snow melted on the northern slopes, rivers swelled with cold water,
and swallows returned from Africa to build nests under the roofs. Farmers ploughed their fields,
shepherds led their flocks to higher pastures, and the orchards filled with pink and white blossoms.
In the evenings, frogs sang loudly in the ponds and the smell of wet grass drifted through open windows.

Mathematics studies patterns, quantities, shapes and change. Geometry measures angles, lengths and
areas; algebra solves equations with unknown variables; calculus describes motion, growth and decay;
probability estimates the chance of uncertain events; statistics draws conclusions from noisy data.
Matrices multiply rows by columns, and the softmax function turns arbitrary scores into probabilities.

The doctor listened to her patient's heartbeat, checked his blood pressure and asked whether he slept
well, exercised regularly and ate enough vegetables. She recommended walking every morning, drinking
plenty of water, avoiding sugary snacks and returning for another examination in six weeks. Healthy
habits, she said, matter more than expensive medicine for most people.

Our journey began at dawn at the railway station. The train crossed wide plains, dark tunnels and
narrow bridges above deep valleys. Through the window we watched castles, vineyards, lakes, windmills
and snowy peaks glide by. At lunch the conductor served soup, fresh bread, roasted chicken, rice and
chocolate cake, and in the afternoon most passengers dozed, read novels or played cards quietly.

Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. January, February, March, April,
May, June, July, August, September, October, November and December. Red, orange, yellow, green, blue,
indigo, violet, black, white, grey, brown and purple. North, south, east and west. Zero, one, two,
three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, hundred, thousand.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
Question: Why do leaves fall in autumn? Answer: Trees drop their leaves to save water in the cold months.
Hello! How are you today? I am fine, thank you. Can you help me write a short poem about the sea?
Of course. The sea is wide, the sea is deep; it sings the sailors all to sleep.
1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14 0.5 (a, b) [x] {y} "quoted" 'single' - + * / = < > ? ! ; :
"""


def text_config(shape: ModelShape = TINY) -> dict[str, Any]:
    """The text_config dict, as DiffusionGemmaTextConfig.to_dict() gives it (keys sorted when written)."""
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": list(EOS_IDS),
        "head_dim": shape.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "layer_types": list(shape.layer_types),
        "max_position_embeddings": shape.max_position_embeddings,
        "model_type": "diffusion_gemma_text",
        "moe_intermediate_size": shape.moe_intermediate_size,
        "num_attention_heads": shape.num_heads,
        "num_experts": shape.num_experts,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pad_token_id": PAD_ID,
        # transformers stores global_head_dim / num_global_key_value_heads only through this override.
        "per_layer_config": {
            str(i): {"head_dim": shape.global_head_dim, "num_key_value_heads": shape.num_global_kv_heads}
            for i, t in enumerate(shape.layer_types)
            if t == "full_attention"
        },
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": shape.sliding_window,
        "tie_word_embeddings": True,
        "top_k_experts": shape.top_k_experts,
        # As in the released model; "all" crashes the 5.23.0 reference's generate.
        "use_bidirectional_attention": "vision",
        "vocab_size": shape.vocab_size,
    }


def model_config(shape: ModelShape = TINY) -> dict[str, Any]:
    """config.json as DiffusionGemmaForBlockDiffusion.save_pretrained writes it (float32 weights)."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        # Image token ids keep transformers' defaults, outside the tiny vocabulary: no text id is an image token.
        "boi_token_id": 255999,
        "canvas_length": shape.canvas_length,
        "dtype": "float32",
        "eoi_token_id": 258882,
        "image_token_id": 258880,
        "initializer_range": 0.02,
        "model_type": "diffusion_gemma",
        "text_config": text_config(shape),
        "tie_word_embeddings": True,
        "transformers_version": "5.23.0",
        # A minimal Gemma 4 vision tower; the checkpoint carries no vision weights (text-only engine).
        "vision_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "max_position_embeddings": 131072,
            "model_type": "gemma4_vision",
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "num_key_value_heads": 2,
            "patch_size": 16,
            "pooling_kernel_size": 3,
            "position_embedding_size": 1024,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
            "standardize": False,
            "use_clipped_linears": False,
        },
    }


def generation_config() -> dict[str, Any]:
    """generation_config.json as DiffusionGemmaGenerationConfig.save_pretrained writes it."""
    return {
        "bos_token_id": BOS_ID,
        "confidence_threshold": 0.005,
        "eos_token_id": list(EOS_IDS),
        "max_denoising_steps": 48,
        "pad_token_id": PAD_ID,
        "return_dict_in_generate": True,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1,
        "t_max": 0.8,
        "t_min": 0.4,
        "transformers_version": "5.23.0",
    }


def tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under transformers' tensor names (encoder/decoder shared, stored once)."""
    rng = np.random.default_rng(seed)
    h, i, im, e = HIDDEN_SIZE, INTERMEDIATE_SIZE, MOE_INTERMEDIATE_SIZE, NUM_EXPERTS

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    def near_one(n: int) -> np.ndarray:
        return normal((n,), 0.1, mean=1.0)

    def linear(out_f: int, in_f: int) -> np.ndarray:
        # ~1/sqrt(fan_in) keeps activations O(1) through the layers.
        return normal((out_f, in_f), in_f**-0.5)

    w: dict[str, np.ndarray] = {}
    d = "model.decoder."
    # Embedding rows carry the LM head too: std 0.2 gives logits of std ~2, i.e. distributions that are
    # neither flat (argmax ties) nor one-hot.
    w[d + "embed_tokens.weight"] = normal((VOCAB_SIZE, h), 0.2)
    w[d + "norm.weight"] = near_one(h)
    sc = d + "self_conditioning."
    w[sc + "pre_norm.weight"] = near_one(h)
    w[sc + "gate_proj.weight"] = linear(i, h)
    w[sc + "up_proj.weight"] = linear(i, h)
    w[sc + "down_proj.weight"] = linear(h, i)

    for layer, layer_type in enumerate(LAYER_TYPES):
        full = layer_type == "full_attention"
        hd = GLOBAL_HEAD_DIM if full else HEAD_DIM
        kv = NUM_GLOBAL_KV_HEADS if full else NUM_KV_HEADS
        p = f"{d}layers.{layer}."
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
            "pre_feedforward_layernorm_2",
        ):
            w[p + norm + ".weight"] = near_one(h)
        w[p + "layer_scalar"] = np.ones((1,), np.float32)
        a = p + "self_attn."
        w[a + "q_proj.weight"] = linear(NUM_HEADS * hd, h)
        w[a + "k_proj.weight"] = linear(kv * hd, h)
        if not full:  # full layers take V from k_proj
            w[a + "v_proj.weight"] = linear(kv * hd, h)
        w[a + "o_proj.weight"] = linear(h, NUM_HEADS * hd)
        w[a + "q_norm.weight"] = near_one(hd)
        w[a + "k_norm.weight"] = near_one(hd)
        w[p + "mlp.gate_proj.weight"] = linear(i, h)
        w[p + "mlp.up_proj.weight"] = linear(i, h)
        w[p + "mlp.down_proj.weight"] = linear(h, i)
        w[p + "router.proj.weight"] = linear(e, h)
        w[p + "router.scale"] = near_one(h)
        w[p + "router.per_expert_scale"] = near_one(e)
        w[p + "experts.gate_up_proj"] = normal((e, 2 * im, h), h**-0.5)
        w[p + "experts.down_proj"] = normal((e, h, im), im**-0.5)
        # The encoder's layer_scalar is a buffer, so transformers saves it apart from the tied weights.
        w[f"model.encoder.language_model.layers.{layer}.layer_scalar"] = w[p + "layer_scalar"].copy()
    return w


def make_tokenizer() -> Any:
    """A byte-level BPE with exactly VOCAB_SIZE ids, trained on the built-in corpus (no network)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > VOCAB_SIZE:
        raise AssertionError(f"tiny tokenizer has {n} ids, more than {VOCAB_SIZE}")
    # The corpus is too small for VOCAB_SIZE merges; fill the rest with reserved ids, as Gemma does.
    tok.add_special_tokens([AddedToken(f"<unused{k}>", special=True, normalized=False) for k in range(VOCAB_SIZE - n)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    for k, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != k:
            raise AssertionError(f"special token {t} has id {tok.token_to_id(t)}, expected {k}")
    return tok


def _dump_json(obj: Any) -> str:
    # transformers' to_json_string format, so our files match save_pretrained byte for byte.
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_text(path: pathlib.Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def _check_target(out: pathlib.Path, config: str) -> None:
    """Refuses a target that is not a directory, or a non-empty one that is not a tiny checkpoint already:
    writing there would overwrite (or mix into) another checkpoint's files."""
    if os.path.lexists(out) and not out.is_dir():  # a dangling symlink too: mkdir would fail on it
        raise ValueError(f"{out} exists and is not a directory")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    ours = set(FILES) | {"model.safetensors.tmp"}
    try:
        same = (out / "config.json").read_text(encoding="utf-8") == config
    except (OSError, UnicodeDecodeError):
        same = False
    if not same or not set(entries) <= ours:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise ValueError(f"{out} is not empty ({shown}) and holds no tiny checkpoint of this version: write the "
                         "tiny checkpoint into a new or empty directory (nothing was written)")


def make_tiny(path: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """Write the tiny random checkpoint into `path` (created if needed) and return it as a Path. A
    non-empty `path` is refused unless it holds a tiny checkpoint already (which is then rewritten)."""
    from safetensors.numpy import save

    out = pathlib.Path(path)
    config = _dump_json(model_config())
    _check_target(out, config)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "config.json", config)
    _write_text(out / "generation_config.json", _dump_json(generation_config()))
    _write_text(out / "tokenizer_config.json", _dump_json(tokenizer_config()))
    _write_text(out / "tokenizer.json", make_tokenizer().to_str(pretty=True))
    # Written last: a present model.safetensors marks a complete checkpoint (see dgemma-bench's cache).
    tmp = out / "model.safetensors.tmp"
    tmp.write_bytes(save(make_weights(seed), metadata={"format": "pt"}))
    os.replace(tmp, out / "model.safetensors")
    return out
