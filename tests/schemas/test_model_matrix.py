"""The model matrix file: valid against its pydantic model and its JSON Schema, in sync, complete."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from schemas.model_matrix import (
    MATRIX_PATH,
    SCHEMA_PATH,
    MatrixError,
    ModelMatrix,
    load_matrix,
    matrix_json_schema,
    render_json_schema,
)

# (family, size) pairs the issue asks for; each must have at least one entry.
REQUIRED = [
    ("llama-3.1", "8B"),
    ("llama-3.2", "1B"),
    ("llama-3.2", "3B"),
    ("qwen2.5", "0.5B"),
    ("qwen2.5", "1.5B"),
    ("qwen2.5", "7B"),
    ("qwen3", "0.6B"),
    ("qwen3", "1.7B"),
    ("qwen3", "4B"),
    ("qwen3", "8B"),
    ("mistral", "7B"),
    ("gemma-2", "2B"),
    ("gemma-2", "9B"),
    ("gemma-3", "1B"),
    ("gemma-3", "4B"),
    ("phi-3.5", "3.8B"),
    ("phi-4", "14B"),
    ("smollm2", "135M"),
    ("smollm2", "360M"),
    ("smollm2", "1.7B"),
    ("qwen3-tts", "0.6B"),
    ("qwen3-tts", "1.7B"),
]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(MATRIX_PATH.read_text())


def test_first_line_says_what_the_file_is():
    first = MATRIX_PATH.read_text().splitlines()[0]
    assert first.startswith("#") and "schemas/model_matrix.schema.json" in first


def test_matrix_validates_against_the_model_and_the_json_schema(raw):
    matrix = load_matrix()
    assert matrix == ModelMatrix.model_validate(raw)
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(raw, schema)


def test_schema_file_is_in_sync_with_the_model():
    assert json.loads(SCHEMA_PATH.read_text()) == matrix_json_schema(), "run `python -m schemas.model_matrix`"
    assert SCHEMA_PATH.read_text() == render_json_schema()


def test_every_required_family_and_size_is_present():
    present = {(m.family, m.size) for m in load_matrix().models}
    assert [r for r in REQUIRED if r not in present] == []
    tts = {m.id: m for m in load_matrix().models if m.kind == "tts"}
    assert set(tts) == {"Qwen/Qwen3-TTS-12Hz-0.6B-Base", "Qwen/Qwen3-TTS-12Hz-1.7B-Base"}


def test_entries_are_consistent():
    for m in load_matrix().models:
        assert m.methods, m.id
        assert m.num_heads % m.num_kv_heads == 0, m.id
        assert (m.kind == "tts") == (m.chat_template.value == "none"), m.id
        if m.architecture.startswith("Phi3"):
            assert {"qkv_proj", "gate_up_proj"} <= set(m.lora_target_modules), m.id
    llama = load_matrix().get("meta-llama/Llama-3.1-8B-Instruct")
    assert llama.parameters == 8_030_261_248 and llama.architecture == "LlamaForCausalLM"
    assert load_matrix().get("google/gemma-3-4b-it").architecture == "Gemma3ForConditionalGeneration"


def test_duplicate_id_is_refused_naming_the_entry(raw):
    bad = copy.deepcopy(raw)
    bad["models"].append(copy.deepcopy(bad["models"][3]))
    with pytest.raises(ValidationError, match=r"models\[22\]: model 'Qwen/Qwen2.5-0.5B-Instruct' is listed twice"):
        ModelMatrix.model_validate(bad)


def test_heads_not_divisible_is_refused_naming_the_entry(raw, tmp_path):
    bad = copy.deepcopy(raw)
    bad["models"][0]["num_kv_heads"] = 7
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    message = str(caught.value)
    assert str(path) in message
    assert "models[0] ('meta-llama/Llama-3.1-8B-Instruct')" in message
    assert "num_heads 32 is not a multiple of num_kv_heads 7" in message


def test_empty_methods_and_misspelt_fields_are_refused(raw, tmp_path):
    bad = copy.deepcopy(raw)
    bad["models"][1]["methods"] = []
    bad["models"][2]["num_kv_head"] = 8
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    message = str(caught.value)
    assert "model 'meta-llama/Llama-3.2-1B-Instruct': methods is empty" in message
    assert "models[2] ('meta-llama/Llama-3.2-3B-Instruct') num_kv_head: Extra inputs are not permitted" in message
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA_PATH.read_text()))
