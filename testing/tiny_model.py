"""Build a tiny random-weight chat model for lem-serve's tests and benchmarks.

Tests and benchmarks need a real model folder that ``mlx_lm.load`` can open,
but they must run offline, fast, and reproducibly, so nothing is downloaded.
This module writes a Hugging-Face-style folder:

* ``config.json``            a Qwen2 config (tied embeddings) with tiny sizes;
* ``model.safetensors``      random weights from ``mlx_lm.models.qwen2.Model``;
* ``tokenizer.json``         a byte-level BPE trained here on local text, so
                             any Unicode (emoji, CJK, ...) encodes, and NFC
                             text round-trips exactly;
* ``tokenizer_config.json``  a ChatML chat template in the style of Qwen2.5
                             (with tools, tool calls and tool results) and the
                             ``json_tools`` tool parser for mlx_lm.

The model produces gibberish, but its prompts, token counts and streaming
behave like a real chat model's.  Special tokens are made impossible to pick
under greedy decoding (see ``_suppress_rows``), so generations always run to
``max_tokens`` and tests don't become short or flaky, and the MLPs are
amplified so greedy output is varied rather than one repeated token.

Agents (Claude Code, Codex) treat a reply cut at the token budget as a
failure, so a model for them can be built with ``end_token_every=N``: every
Nth ordinary token then also ends the reply, as a real model's end-of-turn
token does, and sampled replies stop by themselves after a few tokens.

Usage::

    python testing/tiny_model.py OUT_DIR                  # "tiny" preset
    python testing/tiny_model.py OUT_DIR --preset small   # benchmark model
    python testing/tiny_model.py OUT_DIR --verify         # build, then check
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sysconfig

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Like Qwen2.5, the tool-call markers are single (non-special) added tokens, so
# mlx_lm's tool_call_start_tokens / tool_call_end_tokens are one id each.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

# Sizes used by the CLI's --preset option.  "tiny" equals the function defaults.
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
    "small": dict(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1408,
        vocab_size=4096,
    ),
}

# Qwen2's pre-tokenizer split (as in transformers' Qwen2Tokenizer).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Standard-library modules present on every CPython install; read in this
# fixed order so tokenizer training sees the same text on every build.
STDLIB_FILES = [
    "argparse.py",
    "dataclasses.py",
    "difflib.py",
    "functools.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "string.py",
    "textwrap.py",
]

# A fixed English (plus a little multilingual) corpus, so the tokenizer
# learns prose merges as well as code merges, and training works even on an
# install whose standard library ships without .py sources.
BUILTIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A server answers requests from
clients over HTTP, streams tokens as they are generated, and reports how many
tokens the prompt and the completion used. Good tests are small, fast and
repeatable: they build what they need, run it, and check the result.
You are a helpful assistant. The user asks a question and the assistant
answers it politely, clearly and briefly. What is the weather like today?
It is sunny and warm, with a light breeze from the west. Please summarise the
following text in one sentence. Translate this paragraph into French.
Once upon a time there was a little model that could only speak nonsense, yet
it spoke that nonsense quickly, in order, and always stopped when asked.
Numbers matter too: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -1 1e-6.
{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}
Bonjour, ça va? Très bien, merci. Grüße aus München. ¿Dónde está la estación?
你好，世界。今天天气很好。こんにちは。안녕하세요. Привет, мир! 🌍🚀✨👍
"""


def _training_corpus() -> list[str]:
    """Return the deterministic list of texts the tokenizer is trained on."""
    texts = [BUILTIN_TEXT] * 4  # weight the prose against the larger code
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        path = stdlib / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def build_tokenizer(vocab_size: int, extra_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """Train a byte-level BPE with exactly ``vocab_size`` ids.

    Ordinary tokens come first; the special and tool tokens, then any
    ``extra_tokens`` (non-special added tokens such as "<think>"), are
    appended after them, at the end of the vocabulary, as in Qwen.
    """
    added = SPECIAL_TOKENS + TOOL_TOKENS + list(extra_tokens)
    tok = Tokenizer(models.BPE())
    # transformers (5.x) always loads model_type "qwen2" as Qwen2Tokenizer,
    # which rebuilds the pipeline from vocab + merges with NFC and Qwen's
    # split regex, ignoring tokenizer.json's.  Train with that same pipeline
    # so tokenizer.json and the tokenizer mlx_lm actually uses agree.
    # (NFC means exact round-trips hold for NFC text, as with real Qwen.)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        # All 256 byte symbols, so any Unicode text encodes (no unknowns).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS + list(extra_tokens)]
    )
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}: "
            "the training corpus is too small for this vocab_size"
        )
    return tok


# ChatML in the style of Qwen2.5's template.  Differences from Qwen2.5:
# a neutral default system prompt, ``content: null`` renders as empty, and
# tool-call ``arguments`` given as a JSON string (the OpenAI wire format) are
# written as-is instead of being JSON-encoded a second time.
CHAT_TEMPLATE = r"""{%- macro content_text(message) -%}
    {%- if message.content is string -%}{{- message.content -}}
    {%- elif message.content -%}
        {%- for part in message.content -%}
            {%- if part.text is defined -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- content_text(messages[0]) }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + content_text(messages[0]) + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + content_text(message) + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + content_text(message) }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content_text(message) }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


# The tiny ChatML template as a thinking model's (Qwen3, DeepSeek-R1) would have it: the
# generation prompt opens "<think>" unless enable_thinking is false, and an assistant message
# sent back with its reasoning_content is rendered with it, inside <think>...</think>.
THINK_START, THINK_END = "<think>", "</think>"
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    """    {%- if (message.role == 'user') or""",
    """    {%- if message.role == 'assistant' and message.reasoning_content and not message.tool_calls %}
        {{- '<|im_start|>assistant\\n<think>' + message.reasoning_content + '</think>' + content_text(message) + '<|im_end|>\\n' }}
    {%- elif (message.role == 'user') or""").replace(
    """    {{- '<|im_start|>assistant\\n' }}
{%- endif %}""",
    """    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is not defined or enable_thinking %}{{- '<think>' }}{%- endif %}
{%- endif %}""")
assert THINKING_TEMPLATE.count("<think>") == 2, "CHAT_TEMPLATE changed: update THINKING_TEMPLATE"


def _tokenizer_config(max_length: int) -> dict:
    """Return tokenizer_config.json's contents."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        # HF's clean-up rewrites " ." to "." etc. and breaks exact round-trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
        # mlx_lm.tokenizer_utils.load reads this key and imports
        # mlx_lm.tool_parsers.json_tools: <tool_call>{json}</tool_call>.
        # (It would also infer it from the template, which names both
        # "<tool_call>" and "tool_call.name"; being explicit is sturdier.)
        "tool_parser_type": "json_tools",
    }


def _model_config(args: qwen2.ModelArgs, eos_ids: list[int], pad_id: int) -> dict:
    """Return config.json's contents."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "intermediate_size": args.intermediate_size,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        # <|im_end|> ends a chat turn, <|endoftext|> a document; mlx_lm
        # passes this list on as the tokenizer's eos_token_ids.
        "eos_token_id": eos_ids,
        "bos_token_id": pad_id,
    }


# Target standard deviation of the logits (see _suppress_rows).
LOGIT_STD = 6.0
# Gain on each MLP's output projection (see _amplify_mlps).
MLP_GAIN = 20.0


def _amplify_mlps(model: qwen2.Model) -> None:
    """Make greedy output varied gibberish instead of one repeated token.

    At random init the residual stream is dominated by the current token's
    own (tied) embedding and by near-constant attention averages, so greedy
    decoding locks onto a single token (e.g. an endless run of newlines).
    Scaling up the MLP branch makes the next token a random nonlinear
    function of the context:
    measured on both presets, 200 greedy tokens then hold ~100-190 distinct
    ids.  (Scaling the attention branch instead makes it worse.)
    """
    for layer in model.model.layers:
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * MLP_GAIN


def _suppress_rows(model: qwen2.Model, rows: list[int], n_ordinary: int) -> None:
    """Make the tokens in ``rows`` (special/tool ids) never win greedy decoding.

    The embedding is tied, so a token's logit is ``h . E[t]`` where ``h`` is
    the final-normed hidden state.  Zeroing ``E[t]`` would give logit 0, which
    can still be the maximum, and without an lm_head bias there is no offset
    to push it down.  Instead each suppressed row becomes a *convex
    combination* (positive weights summing to 1) of the ordinary rows:

        logit_t = sum_j w_j * logit_j  <=  max_j logit_j

    for every possible ``h``, with equality only if all ordinary logits tie.
    So greedy decoding can never choose them, whatever the prompt; the
    weights are random so the rows still differ as input embeddings.

    For sampling, the final norm weight is set so logits have a standard
    deviation of about ``LOGIT_STD``: a suppressed logit sits near the mean,
    many nats below the top logits, so at temperature 1 it is very rarely
    sampled either (measured: mean P(any suppressed token) per step ~2e-7 on
    "tiny", ~2e-9 on "small").
    """
    emb = model.model.embed_tokens.weight
    ordinary = emb[:n_ordinary]
    weights = mx.softmax(2.0 * mx.random.normal((len(rows), n_ordinary)), axis=-1)
    emb[mx.array(rows)] = weights @ ordinary
    # With RMS-normed h (|h|^2 ~ hidden) and rows of std 1/sqrt(hidden),
    # logit std ~ norm weight; scale it to the target.
    model.model.norm.weight = mx.full(model.model.norm.weight.shape, LOGIT_STD)
    model.model.embed_tokens.weight = emb


def build_tiny_model(
    out_dir,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    extra_tokens: tuple[str, ...] = (),
    end_token_every: int = 0,
) -> pathlib.Path:
    """Write a random-weight Qwen2 chat model to ``out_dir`` and return its path.

    The same arguments always give byte-identical files. ``end_token_every``
    N > 0 lists every Nth ordinary token id as an end-of-sequence id too
    (config.json's ``eos_token_id``): at temperature 1 about 1/N of each
    step's probability mass then ends the reply (mean length ~N tokens, and
    once in a while the very first token ends it, an empty reply); 0 keeps
    replies running to ``max_tokens``.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(vocab_size, extra_tokens)
    tok.save(str(out / "tokenizer.json"))
    special_ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS + TOOL_TOKENS + list(extra_tokens)]
    n_ordinary = min(special_ids)

    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        rms_norm_eps=1e-6,
        vocab_size=vocab_size,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000,
        tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = qwen2.Model(args)
    _amplify_mlps(model)
    _suppress_rows(model, special_ids, n_ordinary)
    # Keys are already the HF names mlx_lm expects ("model.layers.0...."),
    # and tied embeddings mean there is no lm_head.weight to write.
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(
        str(out / "model.safetensors"), weights, metadata={"format": "mlx"}
    )

    eos_ids = [tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)]
    if end_token_every > 0:
        eos_ids += _turn_end_ids(model, tok, n_ordinary, end_token_every)
    config = _model_config(args, eos_ids, tok.token_to_id(ENDOFTEXT))
    _write_json(out / "config.json", config)
    _write_json(
        out / "tokenizer_config.json", _tokenizer_config(max_position_embeddings)
    )
    return out


PARROT_GAIN = 40.0  # the parrot's next-token logit; every other logit is at most 0


def build_parrot_model(out_dir, scripts: str | dict[str, str], *, seed: int = 0,
                       extra_tokens: tuple[str, ...] = (), chat_template: str | None = None,
                       **tiny_options) -> pathlib.Path:
    """Write a model that answers prompts with chosen scripts, then ends.

    A tiny model is the right tool for most tests, but it cannot say a
    chosen text. This one can, deterministically: every layer's output
    projections are zero, so the residual stream is the current token's own
    embedding, and the (untied) output head maps each token of a chain
    trigger, script tokens..., end-of-sequence to the next one. The chains'
    embeddings are orthonormal, so each next token wins by ``PARROT_GAIN``
    nats: greedy decoding and sampling at any ordinary temperature both
    write exactly the script (its byte-level tokens, partial characters
    included) and then emit <|im_end|>.

    ``scripts`` maps a trigger (the text of one token: the prompt's last) to
    what follows it; a plain string is the script after "\\n" (a chat
    prompt always ends in a newline; completions prompts should too). A
    token may appear only once across all chains (it has one successor); a
    ValueError says otherwise. ``extra_tokens`` and ``chat_template`` are
    passed on to the tokenizer and its config; ``tiny_options`` (vocab_size,
    max_position_embeddings) to build_tiny_model.
    """
    scripts = {"\n": scripts} if isinstance(scripts, str) else scripts
    out = pathlib.Path(build_tiny_model(out_dir, seed=seed, extra_tokens=extra_tokens, **tiny_options))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    chains = [[_one_token(tok, trigger)] + tok.encode(script).ids + [tok.token_to_id(IM_END)]
              for trigger, script in scripts.items()]
    links = [(a, b) for chain in chains for a, b in zip(chain, chain[1:])]
    sources = [a for a, _ in links]
    if len(set(sources)) != len(sources):
        raise ValueError(f"a token repeats across the scripts (each may have one successor): {chains}")
    config = json.loads((out / "config.json").read_text("utf-8"))
    config["tie_word_embeddings"] = False
    args = qwen2.ModelArgs(**{k: config[k] for k in ("model_type", "hidden_size", "intermediate_size",
                              "num_attention_heads", "rms_norm_eps", "vocab_size", "num_key_value_heads",
                              "max_position_embeddings", "rope_theta")},
                           num_hidden_layers=config["num_hidden_layers"], tie_word_embeddings=False)
    mx.random.seed(seed)
    model = qwen2.Model(args)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    hidden = args.hidden_size
    if len(sources) > hidden:
        raise ValueError(f"at most {hidden} tokens across the scripts, got {len(sources)}")
    basis = mx.linalg.qr(mx.random.normal((hidden, hidden)), stream=mx.cpu)[0].T * hidden ** 0.5
    emb, head = model.model.embed_tokens.weight, mx.zeros((args.vocab_size, hidden))
    emb[mx.array(sources)] = basis[: len(sources)]
    # A token with several predecessors (<|im_end|> ends every chain) scores high after each of them.
    head = head.at[mx.array([b for _, b in links])].add(basis[: len(sources)] * (PARROT_GAIN / hidden))
    model.model.embed_tokens.weight = emb
    model.model.norm.weight = mx.ones((hidden,))
    model.lm_head.weight = head
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    _write_json(out / "config.json", config)
    if chat_template is not None:
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text("utf-8"))
        _write_json(out / "tokenizer_config.json", {**tokenizer_config, "chat_template": chat_template})
    return out


def _one_token(tok: Tokenizer, text: str) -> int:
    ids = tok.encode(text).ids
    if len(ids) != 1:
        raise ValueError(f"a trigger must be one token; {text!r} is {ids}")
    return ids[0]


def build_lora_adapter(model_dir, out_dir, *, rank: int = 4, scale: float = 20.0, seed: int = 1) -> pathlib.Path:
    """Write a LoRA adapter for a model folder, in the layout ``mlx_lm.lora`` saves.

    Made with mlx_lm's own LoRA utilities (``linear_to_lora_layers``) rather
    than by training: ``lora_b`` is zero after initialisation, which would
    change nothing, so it is filled with random values large enough to change
    greedy output.
    """
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _tokenizer = load(str(model_dir))
    model.freeze()
    lora = {"rank": rank, "scale": scale, "dropout": 0.0}
    layers = len(model.model.layers)
    linear_to_lora_layers(model, layers, lora)
    mx.random.seed(seed)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        weights[name] = mx.random.normal(value.shape) * 0.05 if name.endswith("lora_b") else value
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    _write_json(out / "adapter_config.json", {"fine_tune_type": "lora", "num_layers": layers,
                                               "lora_parameters": lora})
    return out


def _turn_end_ids(model: qwen2.Model, tok: Tokenizer, n_ordinary: int, every: int) -> list[int]:
    """Every ``every``-th ordinary id, from the offset whose ids are least likely to open a reply.

    A reply's first token follows the template's ``<|im_start|>assistant``
    line, and its distribution depends little on what came before (measured
    on the 4,096-token vocabulary: the same four tokens hold ~75% of it after
    Codex's 9k-token and Claude Code's 18k-token prompts). So the offset is
    chosen on a short conversation: empty replies stay rare (~2% after those
    prompts, against 15-34% for offset 0) while about 1/``every`` of each
    later step's probability mass (11-15% for 8) still ends the reply.
    """
    chat = (f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\nHello!{IM_END}\n"
            f"{IM_START}assistant\n")
    probs = mx.softmax(model(mx.array([tok.encode(chat).ids]))[0, -1])
    masses = [probs[mx.arange(start, n_ordinary, every)].sum().item() for start in range(every)]
    start = masses.index(min(masses))
    return list(range(start, n_ordinary, every))


# Templates of model families that refuse conversations whose roles do not
# alternate user/assistant, written as those families' own templates do.
# Mistral-Instruct (v0.2/v0.3 style): a leading system message is folded in,
# the rest must alternate, starting with the user.
MISTRAL_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + '<|im_end|>' }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Gemma (2/3 style): assistant is "model", a system message is folded into
# the first user turn, and roles must alternate starting with the user.
GEMMA_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


def _copy_model(model_dir, out_dir) -> pathlib.Path:
    """Copy the files of a model folder to ``out_dir``; return its path."""
    src, out = pathlib.Path(model_dir), pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            (out / item.name).write_bytes(item.read_bytes())
    return out


def with_chat_template(model_dir, out_dir, template: str) -> pathlib.Path:
    """Copy a model folder to ``out_dir`` with ``template`` as its chat template."""
    out = _copy_model(model_dir, out_dir)
    config = json.loads((out / "tokenizer_config.json").read_text("utf-8"))
    config["chat_template"] = template
    config.pop("tool_parser_type", None)  # these families' tool formats are not the tiny model's
    _write_json(out / "tokenizer_config.json", config)
    return out


def with_context_length(model_dir, out_dir, tokens: int) -> pathlib.Path:
    """Copy a model folder to ``out_dir`` with a context window of ``tokens``.

    Qwen2's rotary embedding has no table sized by the context, so the weights
    stay as they are; only ``max_position_embeddings`` changes.
    """
    out = _copy_model(model_dir, out_dir)
    config = json.loads((out / "config.json").read_text("utf-8"))
    config["max_position_embeddings"] = tokens
    _write_json(out / "config.json", config)
    return out


def _write_json(path: pathlib.Path, data: dict) -> None:
    """Write ``data`` as stable, human-readable JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _check(ok: bool, message: str) -> None:
    """Raise ``AssertionError(message)`` unless ``ok`` (works under -O too)."""
    if not ok:
        raise AssertionError(message)


def verify_tiny_model(path, max_tokens: int = 200) -> None:
    """Load the model with mlx_lm and check what tests rely on; raise if not."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    text = "héllo 🌍 世界 code(){}\n\t 123"
    ids = tokenizer.encode(text, add_special_tokens=False)
    _check(tokenizer.decode(ids) == text, "round trip is not exact")
    _check(tokenizer.has_tool_calling, "mlx_lm found no tool parser")

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                },
            },
        }
    ]
    chats = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Write a poem about the sea, 🌊."},
        ],
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Paris"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        ],
    ]
    suppressed = set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS + TOOL_TOKENS))
    for i, messages in enumerate(chats):
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools if i == 2 else None, add_generation_prompt=True
        )
        out_ids = []
        for response in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens
        ):
            out_ids.append(response.token)
        _check(len(out_ids) == max_tokens, f"stopped after {len(out_ids)} tokens")
        _check(not suppressed & set(out_ids), "generated a special token")
        _check(len(set(out_ids)) > 10, "output collapsed to a few tokens")
    print("ok:", pathlib.Path(path))


def main(argv=None) -> None:
    """Command-line entry point: build (and optionally verify) a model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--max-position-embeddings", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--end-token-every", type=int, default=0,
                        help="every Nth ordinary token also ends a reply (for agent CLIs); 0 = none")
    parser.add_argument(
        "--verify", action="store_true", help="load it with mlx_lm and check it"
    )
    a = parser.parse_args(argv)

    sizes = dict(PRESETS[a.preset])
    overrides = {
        "hidden_size": a.hidden_size,
        "num_layers": a.layers,
        "num_heads": a.heads,
        "num_kv_heads": a.kv_heads,
        "intermediate_size": a.intermediate_size,
        "vocab_size": a.vocab_size,
    }
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    path = build_tiny_model(
        a.out_dir,
        max_position_embeddings=a.max_position_embeddings,
        seed=a.seed,
        end_token_every=a.end_token_every,
        **sizes,
    )
    if a.verify:
        verify_tiny_model(path)
    print(path)


if __name__ == "__main__":
    main()
