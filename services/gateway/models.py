"""The models the gateway serves and their tokenizers.

The gateway tokenizes every prompt exactly once (rendering chat messages with the model's chat
template) and sends token ids to the replica, so prompt length is checked before any replica is
busy and the engine never tokenizes again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from services.gateway.validation import ValidRequest
from spotmesh.validation import InvalidField


class UnknownModel(KeyError):
    pass


@dataclass
class ServedModel:
    name: str
    path: str
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    # The context length: the model's own until a replica reports the engine's (which may be
    # configured shorter).
    max_model_len: int

    def encode(self, req: ValidRequest) -> list[int]:
        """Token ids for the request, as the engine would produce them from the same text."""
        tok = self.tokenizer
        if req.prompt is not None:
            return tok.encode(req.prompt, add_special_tokens=True)
        if not getattr(tok, "chat_template", None):
            raise InvalidField("messages", f"cannot be used: model {self.name!r} has no chat "
                                           "template; send prompt instead")
        text = tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in req.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        # The template already holds the special tokens (BOS, role markers).
        return tok.encode(text, add_special_tokens=False)


def _model_max_len(path: str, tokenizer) -> int:
    config = Path(path) / "config.json"
    if config.exists():
        cfg = json.loads(config.read_text())
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1 << 24 else 2048


class ModelCatalog:
    def __init__(self, models: dict[str, str]) -> None:
        if not models:
            raise ValueError("the gateway needs at least one --model NAME=DIR")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        self.default = next(iter(models))
        self._models: dict[str, ServedModel] = {}
        for name, path in models.items():
            tok = AutoTokenizer.from_pretrained(path)
            self._models[name] = ServedModel(name, path, tok, _model_max_len(path, tok))

    def resolve(self, name: str) -> ServedModel:
        model = self._models.get(name or self.default)
        if model is None:
            raise UnknownModel(name)
        return model

    def names(self) -> list[str]:
        return list(self._models)

    def observe_context_length(self, name: str, max_model_len: int) -> None:
        """A replica reported the engine's context length; the shortest one wins so that a
        request accepted here fits whichever replica gets it."""
        model = self._models.get(name)
        if model is not None and 0 < max_model_len < model.max_model_len:
            model.max_model_len = max_model_len
