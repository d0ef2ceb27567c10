"""A scripted test model: a model class mlx_lm.load loads, whose replies are fixed token scripts.

For testing output parsing only (reasoning, tool calls), never quality or
speed. Importing this module registers the architecture as
``mlx_lm.models.lem_scripted`` (the server runs in the test's process, and
mlx_lm imports an architecture by its config's model_type).

How it picks what to say: its one "layer" caches the token ids themselves
(as its keys), so each step sees the whole sequence. The prompt's last
trigger (a chosen token, say "SCRIPT3", in the user's message) selects a
script; generation starts after the template's fixed tail (the tokens the
template writes after the user's text: end of turn, the assistant header),
and the model emits the script token by token, then its end token. Unlike
the parrot (tiny_model.build_parrot_model), a script may repeat tokens, so
it can write parallel calls and markers twice.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from tokenizers import AddedToken, Tokenizer

from testing.tiny_model import SPECIAL_TOKENS, TOOL_TOKENS, build_tiny_model

SCRIPT_LOGIT = 100.0


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "lem_scripted"
    vocab_size: int = 512
    scripts: dict = field(default_factory=dict)   # trigger token id (as a string) -> script token ids
    tail: list = field(default_factory=list)      # the template's tokens between the trigger and the reply
    end_id: int = 0                               # what follows every script
    max_position_embeddings: int = 4096


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = mx.zeros((1,))   # mlx_lm.load wants some weights to load
        self.scripts = {int(k): v for k, v in args.scripts.items()}

    @property
    def layers(self) -> list:
        return [self]   # one cache: the token ids so far

    def __call__(self, inputs: mx.array, cache=None, **kwargs) -> mx.array:
        batch, length = inputs.shape
        ids = inputs.astype(mx.float32).reshape(batch, 1, length, 1)
        if cache is not None and cache[0] is not None:
            ids, _ = cache[0].update_and_fetch(ids, ids)
        sequences = ids[:, 0, :, 0].astype(mx.int32).tolist()
        following = mx.array([self.next_token(s) for s in sequences])
        last = mx.where(mx.arange(self.args.vocab_size)[None] == following[:, None], SCRIPT_LOGIT, 0.0)
        return mx.concatenate([mx.zeros((batch, length - 1, self.args.vocab_size)), last[:, None]], axis=1)

    def next_token(self, sequence: list[int]) -> int:
        at = max((i for i, t in enumerate(sequence) if t in self.scripts), default=None)
        if at is None:
            return self.args.end_id
        said = sequence[at + 1 + len(self.args.tail):]
        script = self.scripts[sequence[at]]
        return script[len(said)] if len(sequence) > at + len(self.args.tail) and len(said) < len(script) \
            else self.args.end_id

    def sanitize(self, weights: dict) -> dict:
        return weights


sys.modules["mlx_lm.models.lem_scripted"] = types.SimpleNamespace(Model=Model, ModelArgs=ModelArgs)


def trigger(n: int) -> str:
    """The trigger word of script n: a user message containing it (last) gets script n."""
    return f"SCRIPT{n}"


def build_scripted_model(out_dir, chat_template: str, scripts: list[str], *, tokens: tuple[str, ...] = (),
                         end: str, eos: tuple[str, ...] = (), bos: str | None = None,
                         tail_messages: list[dict] | None = None, template_args: dict | None = None) -> pathlib.Path:
    """Write a model with `chat_template` whose reply to a user message ending in trigger(n) is scripts[n].

    `tokens` are the family's marker tokens (added as single tokens), `end`
    the token that ends every reply, `eos` other end-of-turn tokens, `bos`
    the template's bos_token. The template's tail after the trigger is read
    off its rendering of `tail_messages` (a user message "SCRIPT0" by default)
    with `template_args`: requests must render the same tail.
    """
    words = tuple(trigger(n) for n in range(len(scripts)))
    specials = tuple(t for t in (end, *eos, bos) if t) + tokens
    extra = tuple(t for t in dict.fromkeys(specials + words) if t not in SPECIAL_TOKENS + TOOL_TOKENS)
    out = pathlib.Path(build_tiny_model(out_dir, extra_tokens=extra))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config_path, tokenizer_config_path = out / "config.json", out / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text("utf-8"))
    tokenizer_config.pop("tool_parser_type", None)   # the template decides, as with a real model
    tokenizer_config.update(chat_template=chat_template, eos_token=end, bos_token=bos)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config), "utf-8")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(out))
    messages = tail_messages or [{"role": "user", "content": words[0]}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **(template_args or {}))
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    first = tok.token_to_id(words[0])
    tail = rendered[len(rendered) - rendered[::-1].index(first):]
    config = json.loads(config_path.read_text("utf-8"))
    config.update(model_type="lem_scripted", architectures=["LemScripted"], tail=tail, end_id=tok.token_to_id(end),
                  max_position_embeddings=131072,
                  eos_token_id=[tok.token_to_id(t) for t in (end, *eos)],
                  scripts={str(tok.token_to_id(w)): tok.encode(s).ids for w, s in zip(words, scripts)})
    config_path.write_text(json.dumps(config), "utf-8")
    mx.save_safetensors(str(out / "model.safetensors"), {"weight": mx.zeros((1,))}, metadata={"format": "mlx"})
    return out
