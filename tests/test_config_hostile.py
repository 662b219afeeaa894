"""A config.json is as hostile as a GGUF header: each size is checked against the GGUF limits before anything is
allocated from it, and a bad one is one line naming config.json, the key and the allowed range."""

from __future__ import annotations

import json

import pytest

from planner import plan_for
from planner.hardware import Hardware
from quantize.errors import CorruptModelFile, UserError
from tests.config_fuzz import CONFIGS, HUGE_INTEGER
from tests.conftest import run_cli

GIB = 2**30
CPU = Hardware((), 64 * GIB, 64 * GIB, 8, False, "test")


def checkpoint(tmp_path, text: str):
    """An HF directory holding only config.json, with TEXT in it."""
    d = tmp_path / "ckpt"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(text)
    return d


def with_key(family: str, key: str, raw: str) -> str:
    """FAMILY's config.json with KEY (a.b for a nested one) set to the JSON text RAW."""
    config = json.loads(json.dumps(CONFIGS[family]))
    *outer, last = key.split(".")
    table = config
    for name in outer:
        table = table[name]
    table[last] = "@"
    return json.dumps(config).replace('"@"', raw)


# (family, key, JSON text, what the one line must say): the reproductions first, then their neighbours.
CASES = [
    ("nemotron", "num_hidden_layers", "1e9", "num_hidden_layers = 1000000000.0 is not a whole number from 1 to 512"),
    ("nemotron", "num_hidden_layers", "1000000000", "num_hidden_layers = 1000000000 is not a whole number from 1"),
    ("nemotron", "num_hidden_layers", "-2", "num_hidden_layers = -2 is not a whole number from 1 to 512"),
    ("mistral", "num_attention_heads", "0", "num_attention_heads = 0 is not a whole number from 1 to 64"),
    ("bert", "num_attention_heads", "0", "num_attention_heads = 0 is not a whole number from 1 to 64"),
    ("qwen3", "num_key_value_heads", "0", "num_key_value_heads = 0 is not a whole number from 1 to 4"),
    ("qwen2", "hidden_size", '"256"', "hidden_size = '256' is not a whole number from 1 to 1048576"),
    ("nemotron", "max_position_embeddings", "0", "max_position_embeddings = 0 is not a whole number from 1 to"),
    ("bert", "max_position_embeddings", "-1", "max_position_embeddings = -1 is not a whole number from 1 to"),
    ("qwen2", "vocab_size", "true", "vocab_size = True is not a whole number from 1 to 16777216"),
    ("qwen3", "head_dim", "1e400", "head_dim = inf is not a whole number from 1 to 65536"),
    ("bert", "intermediate_size", "[128]", "intermediate_size = [128] is not a whole number from 1 to 16777216"),
    ("nemotron", "num_key_value_heads", "3", "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    ("mistral", "sliding_window", "-5", "sliding_window = -5 is not a whole number from 1 to"),
    ("nemotron", "rms_norm_eps", '"abc"', "rms_norm_eps = 'abc' is not a number above 0 and at most 1"),
    ("qwen2", "rope_theta", "NaN", "rope_theta = nan is not a number above 0"),
    ("bert", "type_vocab_size", "0", "type_vocab_size = 0 is not a whole number from 1 to"),
    ("nemotron", "rope_scaling.low_freq_factor", "4.0", "high_freq_factor = 4 is not above low_freq_factor = 4"),
    ("nemotron", "rope_scaling.factor", "-8", "rope_scaling.factor = -8 is not a number above 0"),
    ("nemotron", "rope_scaling", "[]", "rope_scaling = [] is not a JSON object"),
    ("nvembed", "text_config.num_hidden_layers", "100000", "num_hidden_layers = 100000 is not a whole number"),
    ("nvembed", "latent_attention_config.num_cross_heads", "0", "num_cross_heads = 0 is not a whole number from 1"),
    ("nvembed", "latent_attention_config", '"x"', "latent_attention_config = 'x' is not a JSON object"),
]


@pytest.mark.parametrize("family,key,raw,message", CASES, ids=[f"{c[0]}-{c[1]}={c[2]}" for c in CASES])
def test_a_bad_size_is_one_line_naming_the_key_and_range(tmp_path, family, key, raw, message) -> None:
    ckpt = checkpoint(tmp_path, with_key(family, key, raw))
    with pytest.raises(CorruptModelFile) as e:
        plan_for(str(ckpt), hardware=CPU)
    assert str(e.value).startswith("ckpt: config.json ") and message in str(e.value), e.value
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[]", "config.json holds list, not a JSON object"),
        ("null", "config.json holds NoneType, not a JSON object"),
        ('{"architectures": [["LlamaModel"]]}', "architecture <missing> is not supported"),
        ('{"architectures": "LlamaModel"}', "architecture <missing> is not supported"),
        (f'{{"architectures": ["LlamaModel"], "hidden_size": {HUGE_INTEGER}}}', "config.json: not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "config.json: not valid JSON"),
    ],
)
def test_a_config_that_is_not_a_table_of_sizes_is_one_line(tmp_path, text, message) -> None:
    with pytest.raises(UserError, match=message):
        plan_for(str(checkpoint(tmp_path, text)), hardware=CPU)


def test_the_published_layouts_still_plan(tmp_path) -> None:
    """The tiny configs of every family, as published checkpoints write them (nulls included), plan."""
    for family, config in CONFIGS.items():
        p = plan_for(str(checkpoint(tmp_path / family, json.dumps(config))), hardware=CPU)
        assert p.shape.layers == 2 and p.chosen.needs.file > 0 and p.settings.max_length >= 1, family


@pytest.mark.parametrize(
    "text",
    [
        with_key("nemotron", "num_hidden_layers", "1e9"),  # allocated until MemoryError
        "[]",  # AttributeError
        with_key("nemotron", "max_position_embeddings", "0"),  # planned "max length 0", exit 0
    ],
)
def test_the_cli_refuses_in_one_line(tmp_path, text) -> None:
    proc = run_cli("plan", "-m", str(checkpoint(tmp_path, text)), "--cpu", "--ram", "8GiB", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ckpt: config.json"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
