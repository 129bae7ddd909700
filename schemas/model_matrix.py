"""The model matrix: which base models LockN Tune supports, their shapes and how each can be tuned.

The data lives in `schemas/model_matrix.yaml`; its JSON Schema, `schemas/model_matrix.schema.json`, is
generated from the models below. After changing a model here, regenerate it with:

    python -m schemas.model_matrix
"""

from __future__ import annotations

import functools
import json
from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.run_spec import Method

MATRIX_PATH = Path(__file__).with_name("model_matrix.yaml")
SCHEMA_PATH = Path(__file__).with_name("model_matrix.schema.json")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class ChatTemplate(str, Enum):
    """The family of prompt format a model's tokenizer chat template renders."""

    llama3 = "llama3"  # <|start_header_id|>role<|end_header_id|> ... <|eot_id|>
    chatml = "chatml"  # <|im_start|>role ... <|im_end|> (Qwen, SmolLM2)
    mistral = "mistral"  # [INST] ... [/INST]
    gemma = "gemma"  # <start_of_turn>user ... <end_of_turn>
    phi3 = "phi3"  # <|user|> ... <|end|><|assistant|>
    phi4 = "phi4"  # <|im_start|>role<|im_sep|> ... <|im_end|>: ChatML-like, but not ChatML
    none = "none"  # no chat template (TTS models)


class ExportSupport(BaseModel):
    """Where a tuned adapter (merged into its base model) can be run outside LockN Tune."""

    model_config = ConfigDict(extra="forbid")

    gguf: bool = Field(description="llama.cpp can convert and run this architecture as GGUF.")
    ollama: bool = Field(description="Ollama can run this architecture (imported from GGUF).")


class ModelEntry(BaseModel):
    """One supported base model: its Hugging Face id, shape, and how it can be tuned."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field in the YAML is an error, not ignored

    id: str = Field(description="The Hugging Face repository id, e.g. 'meta-llama/Llama-3.1-8B-Instruct'.")
    family: str = Field(description="The model family, e.g. 'llama-3.1', 'qwen3', 'qwen3-tts'.")
    size: str = Field(description="The size label the publisher uses, e.g. '8B', '135M'.")
    parameters: int = Field(gt=0, description="Number of parameters (published figure, or derived from config.json).")
    kind: Literal["llm", "tts"] = Field(description="'llm': a causal language model; 'tts': text-to-speech.")
    architecture: str = Field(description="`architectures[0]` of the model's config.json, e.g. 'LlamaForCausalLM'.")
    chat_template: ChatTemplate = Field(description="The family of the model's chat template ('none': it has none).")
    hidden_size: int = Field(gt=0, description="config.json hidden_size (of the text decoder, for multimodal models).")
    num_layers: int = Field(gt=0, description="config.json num_hidden_layers.")
    num_heads: int = Field(gt=0, description="config.json num_attention_heads.")
    num_kv_heads: int = Field(gt=0, description="config.json num_key_value_heads (equal to num_heads without GQA).")
    head_dim: int | None = Field(
        None, gt=0, description="config.json head_dim where it is set explicitly; else hidden_size / num_heads."
    )
    intermediate_size: int = Field(gt=0, description="config.json intermediate_size (the MLP width).")
    vocab_size: int = Field(gt=0, description="config.json vocab_size (of the output head).")
    tie_word_embeddings: bool = Field(description="Whether the output head shares the input embedding's weights.")
    lora_target_modules: list[str] = Field(
        min_length=1, description="Names of the linear layers LoRA adapts, e.g. q_proj, k_proj, v_proj, o_proj."
    )
    methods: list[Method] = Field(
        json_schema_extra={"minItems": 1, "uniqueItems": True},
        description="Tuning methods LockN Tune offers for this model.",
    )
    context_length: int = Field(gt=0, description="Native context window in tokens, as the model card states it.")
    export: ExportSupport = Field(description="llama.cpp (GGUF) and Ollama support for the architecture.")
    license: str = Field(description="The weights' license: an SPDX id where one exists, else its name.")
    notes: str = Field("", description="What a user or maintainer should know: caveats, unverified figures.")

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if not self.methods:
            raise ValueError(f"model {self.id!r}: methods is empty; list at least one of {[m.value for m in Method]}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"model {self.id!r}: methods {[m.value for m in self.methods]} repeats a method")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.id!r}: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}; check config.json num_attention_heads and num_key_value_heads"
            )
        return self

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class ModelMatrix(BaseModel):
    """The supported base models (schemas/model_matrix.yaml)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="Version of the matrix's format; bumped when a field changes meaning.")
    models: list[ModelEntry] = Field(min_length=1, description="The supported models, one entry per Hugging Face id.")

    @model_validator(mode="after")
    def _unique_ids(self) -> ModelMatrix:
        seen: set[str] = set()
        for i, entry in enumerate(self.models):
            if entry.id in seen:
                raise ValueError(f"models[{i}]: model {entry.id!r} is listed twice; keep one entry per id")
            seen.add(entry.id)
        return self

    def get(self, model_id: str) -> ModelEntry | None:
        return next((m for m in self.models if m.id == model_id), None)


class MatrixError(ValueError):
    """The matrix file is missing, not YAML, or does not match ModelMatrix."""


def _describe(errors: ValidationError, data: object) -> str:
    """Each validation error as one line naming the entry by index and id."""
    models = data.get("models") if isinstance(data, dict) else None
    lines = []
    for err in errors.errors():
        loc = list(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int) and isinstance(models, list):
            entry = models[loc[1]] if loc[1] < len(models) else None
            model_id = entry.get("id") if isinstance(entry, dict) else None
            field = ".".join(str(p) for p in loc[2:])
            where = f"models[{loc[1]}] ({model_id!r})" + (f" {field}" if field else "")
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


@functools.cache
def _load(path: Path) -> ModelMatrix:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MatrixError(f"cannot read the model matrix {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MatrixError(f"the model matrix {path} is not valid YAML: {exc}") from None
    try:
        return ModelMatrix.model_validate(data)
    except ValidationError as exc:
        raise MatrixError(
            f"the model matrix {path} does not match its schema ({SCHEMA_PATH.name}); fix:\n{_describe(exc, data)}"
        ) from None


def load_matrix(path: Path | None = None) -> ModelMatrix:
    """The model matrix read from `path` (default: schemas/model_matrix.yaml), validated; cached per path."""
    return _load(Path(path or MATRIX_PATH).resolve())


def matrix_json_schema() -> dict:
    """The JSON Schema of the matrix file, as written to schemas/model_matrix.schema.json."""
    return {"$schema": JSON_SCHEMA_DIALECT, **ModelMatrix.model_json_schema()}


def render_json_schema() -> str:
    return json.dumps(matrix_json_schema(), indent=2) + "\n"


def main() -> None:
    """Regenerate schemas/model_matrix.schema.json from ModelMatrix, then check the matrix file against it."""
    SCHEMA_PATH.write_text(render_json_schema())
    matrix = load_matrix()
    print(f"wrote {SCHEMA_PATH}; {MATRIX_PATH.name} is valid ({len(matrix.models)} models)")


if __name__ == "__main__":
    main()
