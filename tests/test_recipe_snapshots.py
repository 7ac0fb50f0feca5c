"""Error snapshots: a bad recipe and the exact text `recipe validate` prints for it.

Each case is a recipe file (TOML, or JSON for the JSON cases), the full stderr it must produce,
and the exit code (1 for errors, 0 when there are only warnings). The expected text is written
by hand from the recipe text: line and column of the offending key, and the wording of the rule
that fires. A case whose current output is wrong for a user (a bad position, a Python repr, a
confusing or duplicated message) carries the text it should print and is marked
`xfail(strict=True)` with the defect as the reason.

Adding a case: `case("id", recipe_text, expected_stderr)`.

Most recipes are BASE_TOML (a scratch GPT-2 on tests/data/tiny.tsv, mirroring
tests/conftest.py's base_recipe) or QA_TOML (a pretrained catalog model on completion rows)
with a few lines changed by `edit`. Line numbers of BASE_TOML:

     1 name            11 [tokenizer]       22 [[data.tweets.derive]]   35 [train]
     2 seed            12   asset           23   name                   36   epochs
     4 [model]         13   special_tokens  24   from                   37   micro_batch_size
     5   init          14   eos_token       25   edges                  38   learning_rate
     6   n_embd        16 [data.tweets]     26   labels                 40 [[stages]]
     7   n_layer       17   source          28 [template]               41   name
     8   n_head        18   format          29   prompt                 42   kind
     9   dropout       19   columns         30   completion             44 [eval]
                       20   html_unescape   32 [tokens]                 45   label_field
                                            33   truncatable
"""

from __future__ import annotations

import json
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from compiler.cli import main
from tests.conftest import run_cli

TINY_TSV = Path(__file__).resolve().parent / "data" / "tiny.tsv"

BASE_TOML = r'''name = "tiny"
seed = 7

[model]
init = "scratch"
n_embd = 32
n_layer = 2
n_head = 2
dropout = 0.0

[tokenizer]
asset = "gpt2-bpe"
special_tokens = { "<|endoftext|>" = 50256 }
eos_token = "<|endoftext|>"

[data.tweets]
source = { path = "tiny.tsv" }
format = "columns"
columns = ["id", "score", "text"]
html_unescape = ["text"]

[[data.tweets.derive]]
name = "label"
from = "score"
edges = [-0.5, 0.5]
labels = ["negative", "neutral", "positive"]

[template]
prompt = "Input: {{ text }}\nOutput:"
completion = " {{ label }}"

[tokens]
truncatable = ["text"]

[train]
epochs = 1
micro_batch_size = 4
learning_rate = 1e-3

[[stages]]
name = "sft"
kind = "sft"

[eval]
label_field = "label"
'''

# A pretrained catalog model with a LoRA adapter on question/answer rows. Line numbers:
#  1 name, 3 [model], 4 init, 5 hub, 6 catalog, 8 [adapter], 9 kind, 11 [data.qa], 12 source,
#  13 format, 15 [template], 16 prompt, 17 completion, 19 [[stages]], 20 name, 21 kind.
QA_TOML = r'''name = "qa"

[model]
init = "pretrained"
hub = "openai-community/gpt2"
catalog = "gpt2"

[adapter]
kind = "lora"

[data.qa]
source = { path = "rows.jsonl" }
format = "completion"

[template]
prompt = "Q: {{ user_input }}\nA:"
completion = " {{ completion }}"

[[stages]]
name = "sft"
kind = "sft"
'''

ROWS_JSONL = '{"user_input": "What is 2 + 2?", "completion": "4"}\n'


def edit(base: str, *changes: tuple[str, str], add: str | None = None) -> str:
    """`base` with each (old, new) replaced (old must occur exactly once), then `add` appended
    after a blank line."""
    text = base
    for old, new in changes:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    if add is not None:
        text += "\n" + add + "\n"
    return text


def T(*changes: tuple[str, str], add: str | None = None) -> str:
    return edit(BASE_TOML, *changes, add=add)


def QA(*changes: tuple[str, str], add: str | None = None) -> str:
    return edit(QA_TOML, *changes, add=add)


def as_json(toml_text: str) -> str:
    """The same recipe as JSON, the way a team would write it (json.dumps, indent 2)."""
    return json.dumps(tomllib.loads(toml_text), indent=2) + "\n"


@dataclass(frozen=True)
class Case:
    recipe: str | None  # None: no file is written
    expected: str
    file: str = "r.toml"
    exit: int = 1
    files: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False


def case(id: str, recipe: str | None, expected: str, *, file: str = "r.toml", exit: int = 1,
         xfail: str | None = None, files: dict[str, str] | None = None, subprocess: bool = False):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    snapshot = textwrap.dedent(expected).lstrip("\n")
    return pytest.param(Case(recipe, snapshot, file, exit, files or {}, subprocess), id=id, marks=marks)


# Recipes reused by several cases.
LORA = ('kind = "lora"', 'kind = "lora"\ntargets = ["c_attn", "query_key_value"]')
PREFERENCE = (
    ('format = "completion"', 'format = "preference"'),
    (r'prompt = "Q: {{ user_input }}\nA:"', 'prompt = "{{ prompt }}"'),
    ('completion = " {{ completion }}"', 'completion = " {{ chosen }}"'),
)
CHAT = (
    ('format = "completion"', 'format = "openai-chat"'),
    (r'prompt = "Q: {{ user_input }}\nA:"' + '\ncompletion = " {{ completion }}"', 'chat = "chatml"\nsystem = "Be brief."'),
)
SCORED = ('format = "completion"', 'format = "scored"')
SECOND_DATA_SET = '[data.more]\nsource = { path = "tiny.tsv" }\nformat = "columns"\ncolumns = ["id", "label", "text"]'

RLHF_TOML = '''name = "rlhf"

[model]
init = "pretrained"
hub = "openai-community/gpt2"
catalog = "gpt2"

[adapter]
kind = "lora"

[data.chats]
source = { path = "rows.jsonl" }
format = "openai-chat"
template = { chat = "chatml" }

[data.scores]
source = { path = "rows.jsonl" }
format = "scored"
template = { prompt = "{{ user_input }}", completion = "{{ completion }}" }

[[stages]]
name = "rm"
kind = "reward"
data = "scores"
objective = "regression"

[[stages]]
name = "ppo"
kind = "ppo"
data = "chats"
reward_model = "rm"
'''

REPR = "a Python repr leaks into the message: single-quoted 'x' where every other message quotes values as \"x\""

CASES = [
    # ------------------------------------------------------------------ TOML syntax
    case("toml-unclosed-table-header", T(("[tokenizer]", "[tokenizer")), r"""
        error: invalid TOML: Expected ']' at the end of a table declaration
          --> r.toml:11:11
           | [tokenizer

        1 error
        """),
    case("toml-bad-value", T(("seed = 7", "seed = seven")), r"""
        error: invalid TOML: Invalid value
          --> r.toml:2:8
           | seed = seven

        1 error
        """),
    case("toml-duplicate-key", T(("seed = 7", "seed = 7\nseed = 8")), r"""
        error: invalid TOML: key "seed" is defined twice
          --> r.toml:3:1
           | seed = 8

        1 error
        """),
    case("toml-duplicate-table", T(add='[model]\ninit = "scratch"'), r"""
        error: invalid TOML: table [model] is declared twice
          --> r.toml:47:2
           | [model]

        1 error
        """),
    case("toml-unterminated-string", T(('name = "tiny"', 'name = "tiny')), r"""
        error: invalid TOML: unterminated string
          --> r.toml:1:8
           | name = "tiny

        1 error
        """),
    # ------------------------------------------------------------------ JSON syntax
    case("json-missing-brace", '{\n  "name": "tiny",\n  "seed": 7\n', r"""
        error: invalid JSON: Expecting ',' delimiter
          --> r.json:4:1

        1 error
        """, file="r.json"),
    case("json-bad-value", '{\n  "name": "tiny",\n  "seed": seven\n}\n', r"""
        error: invalid JSON: Expecting value
          --> r.json:3:11
           |   "seed": seven

        1 error
        """, file="r.json"),
    case("json-trailing-comma", '{\n  "name": "tiny",\n  "seed": 7,\n}\n', r"""
        error: invalid JSON: Illegal trailing comma before end of object
          --> r.json:3:12
           |   "seed": 7,

        1 error
        """, file="r.json"),
    case("json-top-level-array", '["tiny"]\n', r"""
        error: the top level of r.json must be an object, found an array
          --> r.json:1:1
           | ["tiny"]

        1 error
        """, file="r.json"),
    case("json-duplicate-key",
         as_json(BASE_TOML).replace('"n_head": 2,', '"n_head": 2,\n    "n_layer": "two",'), r"""
        error: invalid JSON: key "n_layer" is defined twice
          --> r.json:9:5
           |     "n_layer": "two",
           = help: remove one of them

        1 error
        """, file="r.json"),
    case("json-byte-order-mark", "\ufeff" + as_json(BASE_TOML), "", file="r.json", exit=0),
    case("recipe-file-not-found", None, r"""
        error: recipe file nope.toml not found
           = help: check the path; recipes usually live under specs/

        1 error
        """, file="nope.toml"),
    case("recipe-in-subdirectory", BASE_TOML, r"""
        error: data.tweets.source.path = "tiny.tsv" matches no file (looked at specs/tiny.tsv)
          --> specs/r.toml:17:12
           | source = { path = "tiny.tsv" }
           = help: paths are relative to the recipe file

        1 error
        """, file="specs/r.toml"),
    # ------------------------------------------------------------------ unknown keys
    case("unknown-key-top-level", T(("seed = 7", "sed = 7")), r"""
        error: unknown key "sed" in the top level
          --> r.toml:2:1
           | sed = 7
           = help: did you mean "seed"?

        1 error
        """),
    # n_head is required, so its misspelling is also a missing key.
    case("unknown-key-model", T(("n_head = 2", "n_heads = 2")), r"""
        error: missing required key "n_head" in [model]
          --> r.toml:4:2
           | [model]
           = key: model.n_head
           = help: n_head: Attention heads per block.

        error: unknown key "n_heads" in [model]
          --> r.toml:8:1
           | n_heads = 2
           = key: model.n_heads
           = help: did you mean "n_head"?

        2 errors
        """, subprocess=True),
    case("unknown-key-model-json", as_json(T(("n_head = 2", "n_heads = 2"))), r"""
        error: missing required key "n_head" in [model]
          --> r.json:4:3
           |   "model": {
           = key: model.n_head
           = help: n_head: Attention heads per block.

        error: unknown key "n_heads" in [model]
          --> r.json:8:5
           |     "n_heads": 2,
           = key: model.n_heads
           = help: did you mean "n_head"?

        2 errors
        """, file="r.json"),
    case("unknown-key-train", T(("learning_rate = 1e-3", "learning_rat = 1e-3")), r"""
        error: unknown key "learning_rat" in [train]
          --> r.toml:38:1
           | learning_rat = 1e-3
           = key: train.learning_rat
           = help: did you mean "learning_rate"?

        1 error
        """),
    case("unknown-key-stage", T(('kind = "sft"', 'kind = "sft"\nepoch = 2')), r"""
        error: unknown key "epoch" in [stages.0]
          --> r.toml:43:1
           | epoch = 2
           = key: stages.0.epoch
           = help: did you mean "epochs"?

        1 error
        """),
    case("unknown-key-data-set", T(('html_unescape = ["text"]', 'html_escape = ["text"]')), r"""
        error: unknown key "html_escape" in [data.tweets]
          --> r.toml:20:1
           | html_escape = ["text"]
           = key: data.tweets.html_escape
           = help: did you mean "html_unescape"?

        1 error
        """),
    case("unknown-key-inline-table", T(('{ path = "tiny.tsv" }', '{ path = "tiny.tsv", pth = "x" }')), r"""
        error: unknown key "pth" in [data.tweets.source]
          --> r.toml:17:31
           | source = { path = "tiny.tsv", pth = "x" }
           = key: data.tweets.source.pth
           = help: did you mean "path"?

        1 error
        """),
    case("unknown-key-derive-and-missing-from", T(('from = "score"', 'form = "score"')), r"""
        error: missing required key "from" in [data.tweets.derive.0]
          --> r.toml:22:3
           | [[data.tweets.derive]]
           = key: data.tweets.derive.0.from
           = help: from: Numeric field the bins are cut from.

        error: unknown key "form" in [data.tweets.derive.0]
          --> r.toml:24:1
           | form = "score"
           = key: data.tweets.derive.0.form
           = help: did you mean "from"?

        2 errors
        """),
    case("unknown-key-adapter", T(add='[adapter]\nkind = "lora"\nlora_rank = 8'), r"""
        error: unknown key "lora_rank" in [adapter]
          --> r.toml:49:1
           | lora_rank = 8
           = key: adapter.lora_rank
           = help: did you mean "rank"?

        1 error
        """),
    case("unknown-key-hardware", T(add='[hardware]\nprecison = "fp32"'), r"""
        error: unknown key "precison" in [hardware]
          --> r.toml:48:1
           | precison = "fp32"
           = key: hardware.precison
           = help: did you mean "precision"?

        1 error
        """),
    case("unknown-key-nested-split", T(add="[data.tweets.split]\nheld_out_fraction = 0.3"), r"""
        error: unknown key "held_out_fraction" in [data.tweets.split]
          --> r.toml:48:1
           | held_out_fraction = 0.3
           = key: data.tweets.split.held_out_fraction
           = help: did you mean "heldout_fraction"?

        1 error
        """),
    case("unknown-key-stage-adapter", T(('kind = "sft"', 'kind = "sft"\n\n[stages.adapter]\nkind = "lora"\nlora_rank = 8')), r"""
        error: unknown key "lora_rank" in [stages.0.adapter]
          --> r.toml:46:1
           | lora_rank = 8
           = key: stages.0.adapter.lora_rank
           = help: did you mean "rank"?

        1 error
        """),
    case("unknown-key-second-stage-json",
         as_json(T(('kind = "sft"', 'kind = "sft"\n\n[[stages]]\nname = "more"\nkind = "sft"\nepochz = 1'))), r"""
        error: unknown key "epochz" in [stages.1]
          --> r.json:71:7
           |       "epochz": 1
           = key: stages.1.epochz
           = help: did you mean "epochs"?

        1 error
        """, file="r.json"),
    case("unknown-key-inline-array-of-tables",
         T(('[[data.tweets.derive]]\nname = "label"\nfrom = "score"\nedges = [-0.5, 0.5]\n'
            'labels = ["negative", "neutral", "positive"]',
            'derive = [{ name = "label", from = "score", edges = [0.0], labels = ["neg", "pos"], bins = 2 }]')), r"""
        error: unknown key "bins" in [data.tweets.derive.0]
          --> r.toml:22:85
           | derive = [{ name = "label", from = "score", edges = [0.0], labels = ["neg", "pos"], bins = 2 }]
           = key: data.tweets.derive.0.bins
           = help: allowed keys: edges, from, labels, name

        1 error
        """),
    # ------------------------------------------------------------------ wrong types
    case("type-string-for-int", T(("n_layer = 2", 'n_layer = "two"')), r"""
        error: model.n_layer = "two": should be a valid integer
          --> r.toml:7:1
           | n_layer = "two"

        1 error
        """),
    case("type-string-for-int-json", as_json(T(("n_layer = 2", 'n_layer = "two"'))), r"""
        error: model.n_layer = "two": should be a valid integer
          --> r.json:7:5
           |     "n_layer": "two",

        1 error
        """, file="r.json"),
    case("type-numeric-string-accepted", T(("n_layer = 2", 'n_layer = "2"')), r"""
        error: model.n_layer = "2": should be a valid integer
          --> r.toml:7:1
           | n_layer = "2"

        1 error
        """),
    case("type-string-or-auto", T(('truncatable = ["text"]', 'max_total = "big"')), r"""
        error: tokens.max_total = "big" is invalid: expected an integer or "auto"
          --> r.toml:33:1
           | max_total = "big"

        1 error
        """),
    case("type-list-element", T(('html_unescape = ["text"]', 'html_unescape = ["text", 3]')), r"""
        error: data.tweets.html_unescape.1 = 3: should be a valid string
          --> r.toml:20:1
           | html_unescape = ["text", 3]

        1 error
        """),
    case("type-not-positive", T(("epochs = 1", "epochs = 0")), r"""
        error: train.epochs = 0: should be greater than 0
          --> r.toml:36:1
           | epochs = 0

        1 error
        """),
    case("type-list-or-literal", T(add='[adapter]\nkind = "lora"\ntargets = "all"'), r"""
        error: adapter.targets = "all" is invalid: expected a valid list or "all-linear"
          --> r.toml:49:1
           | targets = "all"

        1 error
        """),
    case("type-list-for-string", T(('name = "tiny"', 'name = ["tiny"]')), r"""
        error: name = ["tiny"]: should be a valid string
          --> r.toml:1:1
           | name = ["tiny"]

        1 error
        """),
    case("type-table-for-value", T(("seed = 7", "seed = { value = 7 }")), r"""
        error: seed = {"value": 7}: should be a valid integer
          --> r.toml:2:1
           | seed = { value = 7 }

        1 error
        """),
    # ------------------------------------------------------------------ enums
    case("enum-stage-kind", T(('kind = "sft"', 'kind = "sfft"')), r"""
        error: stages.0.kind = "sfft" is not one of: pretrain, sft, reward, dpo, ppo, grpo
          --> r.toml:42:1
           | kind = "sfft"
           = help: did you mean "sft"?

        1 error
        """),
    case("enum-stage-kind-json", as_json(T(('kind = "sft"', 'kind = "sfft"'))), r"""
        error: stages.0.kind = "sfft" is not one of: pretrain, sft, reward, dpo, ppo, grpo
          --> r.json:66:7
           |       "kind": "sfft"
           = help: did you mean "sft"?

        1 error
        """, file="r.json"),
    case("enum-adapter-kind", T(add='[adapter]\nkind = "qlora"'), r"""
        error: adapter.kind = "qlora" is not one of: full, lora, prefix, freeze
          --> r.toml:48:1
           | kind = "qlora"
           = help: did you mean "lora"?

        1 error
        """),
    case("enum-precision", T(add='[hardware]\nprecision = "bfloat16"'), r"""
        error: hardware.precision = "bfloat16" is not one of: fp32, bf16, fp16
          --> r.toml:48:1
           | precision = "bfloat16"
           = help: did you mean "bf16"?

        1 error
        """),
    case("enum-lr-schedule", T(("learning_rate = 1e-3", 'learning_rate = 1e-3\nlr_schedule = "cosin"')), r"""
        error: train.lr_schedule = "cosin" is not one of: cosine, linear, constant, constant_with_warmup
          --> r.toml:39:1
           | lr_schedule = "cosin"
           = help: did you mean "cosine"?

        1 error
        """),
    case("enum-data-format", T(('format = "columns"', 'format = "completon"')), r"""
        error: data.tweets.format = "completon" is not one of: columns, instruction, completion, scored, preference, prompt, openai-chat, chatglm-chat, sharegpt
          --> r.toml:18:1
           | format = "completon"
           = help: did you mean "completion"?

        1 error
        """),
    case("enum-zero-stage", T(add="[hardware]\nzero_stage = 4"), r"""
        error: hardware.zero_stage = 4 is not one of: 0, 1, 2, 3
          --> r.toml:48:1
           | zero_stage = 4

        1 error
        """),
    case("enum-zero-stage-quoted", T(add='[hardware]\nzero_stage = "2"'), r"""
        error: hardware.zero_stage = "2" is not one of: 0, 1, 2, 3
          --> r.toml:48:1
           | zero_stage = "2"
           = help: write the number without quotes: zero_stage = 2

        1 error
        """),
    # ------------------------------------------------------------------ missing required keys
    case("missing-model-init", T(('init = "scratch"\n', "")), r"""
        error: missing required key "init" in [model]
          --> r.toml:4:2
           | [model]
           = key: model.init
           = help: init is one of: scratch, pretrained

        1 error
        """),
    case("missing-model-init-json", as_json(T(('init = "scratch"\n', ""))), r"""
        error: missing required key "init" in [model]
          --> r.json:4:3
           |   "model": {
           = key: model.init
           = help: init is one of: scratch, pretrained

        1 error
        """, file="r.json"),
    case("missing-adapter-kind", T(add="[adapter]\nrank = 8"), r"""
        error: missing required key "kind" in [adapter]
          --> r.toml:47:2
           | [adapter]
           = key: adapter.kind
           = help: kind is one of: full, lora, prefix, freeze

        1 error
        """),
    case("missing-stages", T(('[[stages]]\nname = "sft"\nkind = "sft"\n\n', "")), r"""
        error: missing required key "stages" in the top level
          --> r.toml
           = help: stages: Training stages, run in order; each may start from an earlier one's weights.

        1 error
        """),
    case("missing-stage-kind", T(('kind = "sft"\n', "")), r"""
        error: missing required key "kind" in [stages.0]
          --> r.toml:40:3
           | [[stages]]
           = key: stages.0.kind
           = help: kind is one of: pretrain, sft, reward, dpo, ppo, grpo

        1 error
        """),
    case("missing-data-format", T(('format = "columns"\n', "")), r"""
        error: missing required key "format" in [data.tweets]
          --> r.toml:16:2
           | [data.tweets]
           = key: data.tweets.format
           = help: format: Record shape: columns (free columns), instruction, completion, scored, preference, prompt, openai-chat (messages), chatglm-chat (conversations with role/content) or sharegpt (from/value).

        1 error
        """),
    # ------------------------------------------------------------------ rules inside the schema
    case("schema-heads-divide-width", T(("n_head = 2", "n_head = 3")), r"""
        error: n_embd (32) must be divisible by n_head (3); e.g. n_head = 2
          --> r.toml:4:2
           | [model]
           = key: model

        1 error
        """),
    case("schema-name-pattern", T(('name = "tiny"', 'name = "Tiny"')), r"""
        error: name "Tiny" must be lowercase letters, digits, '.', '_' or '-' (it names the build directory)
          --> r.toml:1:1
           | name = "Tiny"

        1 error
        """),
    case("schema-duplicate-stage-name",
         T(('kind = "sft"', 'kind = "sft"\n\n[[stages]]\nname = "sft"\nkind = "sft"')), r"""
        error: two stages are named "sft"; stage names must be unique
          --> r.toml:45:1
           | name = "sft"
           = key: stages.1.name

        1 error
        """),
    case("schema-stage-named-base", T(('name = "sft"', 'name = "base"')), r"""
        error: "base" names the recipe's [model]; give the stage another name
          --> r.toml:41:1
           | name = "base"
           = key: stages.0.name

        1 error
        """),
    case("schema-derive-labels-per-bin",
         T(('labels = ["negative", "neutral", "positive"]', 'labels = ["negative", "positive"]')), r"""
        error: 2 edges cut 3 bins but 2 labels are given; give one label per bin
          --> r.toml:22:3
           | [[data.tweets.derive]]
           = key: data.tweets.derive.0

        1 error
        """),
    case("schema-source-exactly-one",
         T(('{ path = "tiny.tsv" }', '{ path = "tiny.tsv", asset = "vader-tweets" }')), r"""
        error: give exactly one of asset = "..." or path = "..." or hub = "..." in source (found asset, path)
          --> r.toml:17:1
           | source = { path = "tiny.tsv", asset = "vader-tweets" }
           = key: data.tweets.source

        1 error
        """),
    case("schema-epochs-and-max-steps", T(("epochs = 1", "epochs = 1\nmax_steps = 100")), r"""
        error: give epochs or max_steps, not both
          --> r.toml:35:2
           | [train]
           = key: train

        1 error
        """),
    case("schema-fp16-on-cpu", T(add='[hardware]\nprecision = "fp16"'), r"""
        error: fp16 training needs a GPU; use precision = "fp32" or "bf16" on cpu
          --> r.toml:47:2
           | [hardware]
           = key: hardware

        1 error
        """),
    case("schema-eval-needs-label-field", T(('label_field = "label"', 'extract = "first_word"')), r"""
        error: kind = "classification" needs label_field = "<field holding the label>"
          --> r.toml:44:2
           | [eval]
           = key: eval

        1 error
        """),
    case("schema-no-template",
         T(('[template]\nprompt = "Input: {{ text }}\\nOutput:"\ncompletion = " {{ label }}"\n\n', "")), r"""
        error: data set "tweets" has no template
          --> r.toml:16:2
           | [data.tweets]
           = key: data.tweets
           = help: add a [template] section, or [data.tweets.template]

        1 error
        """),
    # ------------------------------------------------------------------ checks.py: model
    case("catalog-unknown", QA(('catalog = "gpt2"', 'catalog = "gpt-2"')), r"""
        error: model.catalog = "gpt-2" is not in the model catalog (specs/models)
          --> r.toml:6:1
           | catalog = "gpt-2"
           = help: did you mean "gpt2"?

        1 error
        """),
    case("config-json-unreadable", QA(('catalog = "gpt2"', 'config = "config.json"')), r"""
        error: cannot read config.json: No such file or directory
          --> r.toml:6:1
           | config = "config.json"
           = key: model.config
           = help: point at the checkpoint's config.json, or name a catalog entry

        1 error
        """),
    case("config-json-without-model-type", QA(('catalog = "gpt2"', 'config = "config.json"')), r"""
        error: config.json has no model_type; it is not a Hugging Face model config.json
          --> r.toml:6:1
           | config = "config.json"
           = key: model.config
           = help: point at the checkpoint's config.json, or name a catalog entry

        1 error
        """, files={"config.json": '{"hidden_size": 8}'}),
    case("hub-model-neither-reachable-nor-cached",
         QA(('hub = "openai-community/gpt2"\ncatalog = "gpt2"', 'hub = "someone/tiny-model"\nrevision = "main"')), r"""
        error: cannot reach the hub for someone/tiny-model (revision main) and its config.json is not in the Hugging Face cache: connect to the network, or download it once and set HF_HUB_OFFLINE=1 with that warm cache, or give config = "path/to/config.json" in [model]
          --> r.toml:5:1
           | hub = "someone/tiny-model"
           = key: model.hub

        1 error
        """),
    case("model-path-not-a-directory", QA(('hub = "openai-community/gpt2"', 'path = "ckpt"')), r"""
        error: model.path = "ckpt" is not a directory
          --> r.toml:5:1
           | path = "ckpt"
           = help: paths are relative to the recipe file

        1 error
        """),
    case("chatglm-needs-trust-remote-code",
         QA(('hub = "openai-community/gpt2"\ncatalog = "gpt2"', 'hub = "THUDM/chatglm3-6b"\ncatalog = "chatglm3-6b"')), r"""
        error: chatglm3-6b ships its own modelling code, which runs only with trust_remote_code = true
          --> r.toml:3:2
           | [model]
           = help: review the checkpoint's Python files, then set trust_remote_code = true in [model]

        1 error
        """),
    case("quantization-with-freeze-adapter",
         QA(('catalog = "gpt2"', 'catalog = "gpt2"\nquantization = "4bit"'), ('kind = "lora"', 'kind = "freeze"')), r"""
        error: model.quantization = "4bit" freezes the base weights, but adapter trains them (freeze)
          --> r.toml:9:2
           | [adapter]
           = help: use kind = "lora" or "prefix", or quantization = "none"

        1 error
        """),
    case("quantization-with-default-adapter",
         QA(('catalog = "gpt2"', 'catalog = "gpt2"\nquantization = "8bit"'), ('[adapter]\nkind = "lora"\n\n', ""),
            add="[train]\nlearning_rate = 1e-5"), r"""
        error: model.quantization = "8bit" freezes the base weights, but adapter trains them (full)
          --> r.toml:7:1
           | quantization = "8bit"
           = help: use kind = "lora" or "prefix", or quantization = "none"

        1 error
        """),
    case("max-total-beyond-context", QA(add="[tokens]\nmax_total = 2048"), r"""
        error: tokens.max_total = 2048 exceeds the context length of gpt2 (1024)
          --> r.toml:24:1
           | max_total = 2048
           = help: set tokens.max_total to at most 1024

        1 error
        """),
    case("max-total-beyond-n-positions",
         T(("dropout = 0.0", "n_positions = 64"), ('truncatable = ["text"]', "max_total = 128")), r"""
        error: tokens.max_total = 128 exceeds model.n_positions = 64
          --> r.toml:33:1
           | max_total = 128
           = help: set model.n_positions = "auto" to size the model from the budget

        1 error
        """),
    # ------------------------------------------------------------------ checks.py: tokenizer and assets
    case("scratch-model-needs-tokenizer",
         T(('[tokenizer]\nasset = "gpt2-bpe"\nspecial_tokens = { "<|endoftext|>" = 50256 }\n'
            'eos_token = "<|endoftext|>"\n\n', "")), r"""
        error: a model trained from scratch needs a tokenizer
          --> r.toml:4:2
           | [model]
           = help: add [tokenizer] with asset = "gpt2-bpe" (or path = "..."), special_tokens and eos_token

        1 error
        """),
    case("scratch-model-tokenizer-subtable-only",
         T(('[tokenizer]\nasset = "gpt2-bpe"\nspecial_tokens = { "<|endoftext|>" = 50256 }\neos_token = "<|endoftext|>"',
            '[tokenizer.special_tokens]\n"<|endoftext|>" = 50256')), r"""
        error: a model trained from scratch needs a tokenizer
          --> r.toml:11:2
           | [tokenizer.special_tokens]
           = help: add [tokenizer] with asset = "gpt2-bpe" (or path = "..."), special_tokens and eos_token

        1 error
        """),
    case("tokenizer-path-missing", T(('asset = "gpt2-bpe"', 'path = "tok"')), r"""
        error: tokenizer.path = "tok" not found
          --> r.toml:12:1
           | path = "tok"
           = help: paths are relative to the recipe file

        1 error
        """),
    case("tiktoken-needs-eos", T(('eos_token = "<|endoftext|>"', 'pad_token = "<|endoftext|>"')), r"""
        error: a tiktoken tokenizer needs eos_token
          --> r.toml:11:2
           | [tokenizer]
           = help: add eos_token = "<|endoftext|>" and list it in special_tokens

        1 error
        """),
    case("eos-not-a-special-token", T(('eos_token = "<|endoftext|>"', 'eos_token = "<|end|>"')), r"""
        error: tokenizer.eos_token = "<|end|>" is not in tokenizer.special_tokens
          --> r.toml:14:1
           | eos_token = "<|end|>"
           = help: add { "<|end|>" = ID } to tokenizer.special_tokens

        1 error
        """),
    case("pad-not-a-special-token",
         T(('eos_token = "<|endoftext|>"', 'eos_token = "<|endoftext|>"\npad_token = "<pad>"')), r"""
        error: tokenizer.pad_token = "<pad>" is not in tokenizer.special_tokens
          --> r.toml:15:1
           | pad_token = "<pad>"

        1 error
        """),
    case("asset-unknown-tokenizer", T(('asset = "gpt2-bpe"', 'asset = "gpt2-bpee"')), r"""
        error: tokenizer.asset = "gpt2-bpee" is not a pinned asset
          --> r.toml:12:1
           | asset = "gpt2-bpee"
           = help: did you mean "gpt2-bpe"?

        1 error
        """),
    case("asset-unknown-data", T(('{ path = "tiny.tsv" }', '{ asset = "vader-tweet" }')), r"""
        error: data.tweets.source.asset = "vader-tweet" is not a pinned asset
          --> r.toml:17:12
           | source = { asset = "vader-tweet" }
           = help: did you mean "vader-tweets"?

        1 error
        """),
    # ------------------------------------------------------------------ checks.py: adapters
    case("lora-target-not-in-architecture", QA(LORA), r"""
        error: adapter.targets names "query_key_value", which is not a linear layer of gpt2 blocks
          --> r.toml:10:1
           | targets = ["c_attn", "query_key_value"]
           = help: gpt2 linear layers: c_attn, c_fc, c_proj

        1 error
        """),
    case("freeze-layers-beyond-model",
         QA(('kind = "lora"', 'kind = "freeze"\ntrainable_layers = [0, 12]')), r"""
        error: adapter.trainable_layers = [0, 12] but the model has 12 layers (indices 0..11)
          --> r.toml:10:1
           | trainable_layers = [0, 12]

        1 error
        """),
    case("freeze-module-not-in-block",
         QA(('kind = "lora"', 'kind = "freeze"\ntrainable_modules = ["self_attn"]')), r"""
        error: adapter.trainable_modules names "self_attn", which is not part of a gpt2 block
          --> r.toml:10:1
           | trainable_modules = ["self_attn"]
           = help: did you mean "c_attn"?

        1 error
        """),
    # ------------------------------------------------------------------ checks.py: hardware
    case("gpu-needs-cuda", T(add='[hardware]\ngpu = "a100-sxm-80gb"'), r"""
        error: hardware.gpu = "a100-sxm-80gb" needs hardware.device = "cuda"
          --> r.toml:48:1
           | gpu = "a100-sxm-80gb"

        1 error
        """),
    case("gpu-unknown", T(add='[hardware]\ndevice = "cuda"\ngpu = "h100-sxm"'), r"""
        error: hardware.gpu = "h100-sxm" is not in the hardware catalog (specs/hardware)
          --> r.toml:49:1
           | gpu = "h100-sxm"
           = help: did you mean "h100-sxm-80gb"?

        1 error
        """),
    case("bf16-on-v100", T(add='[hardware]\ndevice = "cuda"\ngpu = "v100-sxm2-32gb"\nprecision = "bf16"'), r"""
        error: v100-sxm2-32gb has no bf16 support
          --> r.toml:50:1
           | precision = "bf16"
           = key: hardware.precision
           = help: use precision = "fp16" (with loss scaling) or "fp32"

        1 error
        """),
    case("warning-cuda-without-gpu", T(add='[hardware]\ndevice = "cuda"'), r"""
        warning: hardware.gpu is not set: the plan cannot check memory or estimate time and cost
          --> r.toml:48:1
           | device = "cuda"
           = key: hardware.device
           = help: add gpu = "h100-sxm-80gb" (see specs/hardware)

        1 warning
        """, exit=0),
    case("warning-zero-stage-single-process", T(add="[hardware]\nzero_stage = 2"), r"""
        warning: zero_stage = 2 with a single process shards nothing
          --> r.toml:48:1
           | zero_stage = 2
           = key: hardware.zero_stage
           = help: use more processes, enable offload, or zero_stage = 0

        1 warning
        """, exit=0),
    # ------------------------------------------------------------------ checks_data.py: data sets
    case("data-path-missing", T(('{ path = "tiny.tsv" }', '{ path = "missing.tsv" }')), r"""
        error: data.tweets.source.path = "missing.tsv" matches no file (looked at missing.tsv)
          --> r.toml:17:12
           | source = { path = "missing.tsv" }
           = help: paths are relative to the recipe file

        1 error
        """),
    case("data-path-missing-json", as_json(T(('{ path = "tiny.tsv" }', '{ path = "missing.tsv" }'))), r"""
        error: data.tweets.source.path = "missing.tsv" matches no file (looked at missing.tsv)
          --> r.json:21:9
           |         "path": "missing.tsv"
           = help: paths are relative to the recipe file

        1 error
        """, file="r.json", subprocess=True),
    case("columns-on-json-file", T(('format = "columns"', 'format = "columns"\nfile_format = "jsonl"')), r"""
        error: data.tweets.columns applies to TSV/CSV files, but this file is jsonl
          --> r.toml:20:1
           | columns = ["id", "score", "text"]
           = help: remove columns; JSON records name their own fields

        1 error
        """),
    case("fields-rename-to-unknown-field",
         QA(('format = "completion"', 'format = "completion"\nfields = { user_input = "question", answer = "response" }')), r"""
        error: data.qa.fields renames to "answer", which is not a field of format "completion"
          --> r.toml:14:37
           | fields = { user_input = "question", answer = "response" }
           = key: data.qa.fields.answer
           = help: completion fields: completion, user_input

        1 error
        """),
    case("errors-before-warnings",
         T(('label_field = "label"', 'label_field = "labels"'), add='[hardware]\ndevice = "cuda"'), r"""
        error: eval.label_field = "labels" is not a field of data set "tweets"
          --> r.toml:45:1
           | label_field = "labels"
           = help: did you mean "label"?

        warning: hardware.gpu is not set: the plan cannot check memory or estimate time and cost
          --> r.toml:48:1
           | device = "cuda"
           = key: hardware.device
           = help: add gpu = "h100-sxm-80gb" (see specs/hardware)

        1 error, 1 warning
        """),
    case("derive-from-unknown-field", T(('from = "score"', 'from = "scores"')), r"""
        error: data.tweets.derive[0] reads "scores", which is not a field
          --> r.toml:24:1
           | from = "scores"
           = key: data.tweets.derive.0.from
           = help: did you mean "score"?

        1 error
        """),
    case("html-unescape-unknown-field", T(('html_unescape = ["text"]', 'html_unescape = ["txt"]')), r"""
        error: data.tweets.html_unescape names "txt", which is not a field
          --> r.toml:20:1
           | html_unescape = ["txt"]
           = help: did you mean "text"?

        1 error
        """),
    # ------------------------------------------------------------------ checks_data.py: templates
    case("chat-data-with-prompt-template", QA(('format = "completion"', 'format = "openai-chat"')), r"""
        error: data set "qa" holds conversations (openai-chat) but the template is prompt/completion
          --> r.toml:15:2
           | [template]
           = help: use a chat template: chat = "chatml" (or llama3, chatglm3, tokenizer)

        1 error
        """),
    case("chat-template-on-columns",
         T((r'prompt = "Input: {{ text }}\nOutput:"' + '\ncompletion = " {{ label }}"',
            'chat = "chatml"\nsystem = "Be brief."')), r"""
        error: data set "tweets" has free columns, which have no roles for chat = "chatml"
          --> r.toml:29:1
           | chat = "chatml"
           = key: template.chat
           = help: write prompt and completion templates, or use format = "completion"

        1 error
        """),
    case("chat-template-with-completion-loss",
         QA(CHAT[0], (CHAT[1][0], 'chat = "chatml"\nloss = "completion"')), r"""
        error: template.loss = "completion" applies to prompt/completion templates
          --> r.toml:17:1
           | loss = "completion"
           = help: with a chat template use "assistant", "last_assistant" or "all"

        1 error
        """),
    case("assistant-loss-without-chat-template",
         QA(('completion = " {{ completion }}"', 'completion = " {{ completion }}"\nloss = "assistant"')), r"""
        error: template.loss = "assistant" needs a chat template
          --> r.toml:18:1
           | loss = "assistant"
           = help: use loss = "completion", or chat = "chatml"

        1 error
        """),
    case("tokenizer-chat-template-on-tiktoken",
         QA(CHAT[0], (CHAT[1][0], 'chat = "tokenizer"\nloss = "assistant"'),
            add='[tokenizer]\nasset = "gpt2-bpe"\nspecial_tokens = { "<|endoftext|>" = 50256 }\neos_token = "<|endoftext|>"'),
         r"""
        error: chat = "tokenizer" needs a tokenizer that carries a chat template; tiktoken ranks do not
          --> r.toml:16:1
           | chat = "tokenizer"
           = key: template.chat
           = help: name a built-in template such as chat = "chatml"

        1 error
        """),
    case("template-without-completion", QA(('completion = " {{ completion }}"', "add_eos = true")), r"""
        error: the template has no completion
          --> r.toml:15:2
           | [template]
           = help: add completion = "..." (or completion_file)

        1 error
        """),
    case("template-file-missing", QA((r'prompt = "Q: {{ user_input }}\nA:"', 'prompt_file = "prompt.j2"')), r"""
        error: template.prompt_file = "prompt.j2" not found
          --> r.toml:16:1
           | prompt_file = "prompt.j2"
           = help: paths are relative to the recipe file

        1 error
        """),
    case("template-syntax-error", QA((r'{{ user_input }}\nA:', r'{{ user_input }\nA:')), r"""
        error: template.prompt: template syntax error: unexpected '}'
          --> r.toml:16:1
           | prompt = "Q: {{ user_input }\nA:"

        1 error
        """),
    case("template-after-multiline-string",
         T((r'prompt = "Input: {{ text }}\nOutput:"', 'prompt = """\nInput: {{ text }}\nOutput:"""'),
           ('completion = " {{ label }}"', 'completion = " {{ labels }}"')), r"""
        error: template.completion uses {{ labels }} but data set "tweets" has no field "labels"
          --> r.toml:32:1
           | completion = " {{ labels }}"
           = help: did you mean "label"?

        1 error
        """),
    case("template-field-not-in-data", QA((r'{{ user_input }}\nA:', r'{{ question }}\nA:')), r"""
        error: template.prompt uses {{ question }} but data set "qa" has no field "question"
          --> r.toml:16:1
           | prompt = "Q: {{ question }}\nA:"
           = help: fields available: completion, user_input

        1 error
        """),
    case("template-field-typo-no-cascade", T((r"{{ text }}\nOutput:", r"{{ txt }}\nOutput:")), r"""
        error: template.prompt uses {{ txt }} but data set "tweets" has no field "txt"
          --> r.toml:29:1
           | prompt = "Input: {{ txt }}\nOutput:"
           = help: did you mean "text"?

        1 error
        """),
    case("truncatable-with-chat-template",
         QA((r'prompt = "Q: {{ user_input }}\nA:"' + '\ncompletion = " {{ completion }}"', 'chat = "chatml"'),
            add='[tokens]\ntruncatable = ["user_input"]'), r"""
        error: tokens.truncatable names fields, but data set "qa" is rendered with a chat template, whose conversations are never cut by field
          --> r.toml:23:1
           | truncatable = ["user_input"]
           = help: remove tokens.truncatable, or size tokens.max_total (and tokens.overflow) for whole conversations

        1 error
        """),
    case("truncatable-not-in-prompt", T(('truncatable = ["text"]', 'truncatable = ["id"]')), r"""
        error: tokens.truncatable names "id", which template.prompt does not use
          --> r.toml:33:1
           | truncatable = ["id"]
           = help: prompt fields: text

        1 error
        """),
    case("truncatable-in-completion", T(('truncatable = ["text"]', 'truncatable = ["label"]')), r"""
        error: tokens.truncatable names "label", which template.completion uses; the completion is never truncated
          --> r.toml:33:1
           | truncatable = ["label"]
           = help: remove "label" from tokens.truncatable

        1 error
        """),
    case("truncatable-reported-once",
         T(('truncatable = ["text"]', 'truncatable = ["id"]'), ('kind = "sft"', 'kind = "sft"\ndata = "tweets"'),
           add=SECOND_DATA_SET), r"""
        error: tokens.truncatable names "id", which template.prompt does not use
          --> r.toml:33:1
           | truncatable = ["id"]
           = help: prompt fields: text

        1 error
        """),
    # ------------------------------------------------------------------ checks_data.py: stages
    case("from-later-stage",
         T(('kind = "sft"', 'kind = "sft"\nfrom = "more"\n\n[[stages]]\nname = "more"\nkind = "sft"')), r"""
        error: stage "sft": from = "more" runs later (the stage it starts from must come earlier)
          --> r.toml:43:1
           | from = "more"
           = key: stages.0.from
           = help: reorder [[stages]] or name an earlier stage

        1 error
        """),
    case("from-unknown-stage", T(('kind = "sft"', 'kind = "sft"\nfrom = "pretrain"')), r"""
        error: stage "sft": from = "pretrain" is not a stage
          --> r.toml:43:1
           | from = "pretrain"
           = key: stages.0.from
           = help: choices: base

        1 error
        """),
    case("dpo-reference-unknown",
         QA(*PREFERENCE, ('name = "sft"\nkind = "sft"', 'name = "dpo"\nkind = "dpo"\nreference = "sft"')), r"""
        error: stage "dpo": reference = "sft" is not a stage
          --> r.toml:22:1
           | reference = "sft"
           = key: stages.0.reference
           = help: choices: base

        1 error
        """),
    case("ppo-critic-from-unknown",
         QA(SCORED, ('name = "sft"\nkind = "sft"', 'name = "rm"\nkind = "reward"\nobjective = "regression"\n\n'
                     '[[stages]]\nname = "ppo"\nkind = "ppo"\nreward_model = "rm"\ncritic_from = "value"')), r"""
        error: stage "ppo": critic_from = "value" is not a stage
          --> r.toml:28:1
           | critic_from = "value"
           = key: stages.1.critic_from
           = help: choices: base, rm

        1 error
        """),
    case("ppo-reward-model-not-a-reward-stage",
         QA(('name = "sft"\nkind = "sft"',
             'name = "lm"\nkind = "pretrain"\n\n[[stages]]\nname = "ppo"\nkind = "ppo"\nreward_model = "lm"')), r"""
        error: stage "ppo": reward_model = "lm" is a pretrain stage, not a reward stage
          --> r.toml:26:1
           | reward_model = "lm"
           = key: stages.1.reward_model
           = help: name a stage with kind = "reward"

        1 error
        """),
    case("ppo-reward-model-runs-later",
         QA(SCORED, ('name = "sft"\nkind = "sft"', 'name = "ppo"\nkind = "ppo"\nreward_model = "rm"\n\n'
                     '[[stages]]\nname = "rm"\nkind = "reward"\nobjective = "regression"')), r"""
        error: stage "ppo": reward_model = "rm" runs later
          --> r.toml:22:1
           | reward_model = "rm"
           = key: stages.0.reward_model
           = help: put the reward stage before the ppo stage

        1 error
        """),
    case("ppo-reward-model-unknown",
         QA(SCORED, ('name = "sft"\nkind = "sft"', 'name = "rm"\nkind = "reward"\nobjective = "regression"\n\n'
                     '[[stages]]\nname = "ppo"\nkind = "ppo"\nreward_model = "reward"')), r"""
        error: stage "ppo": reward_model = "reward" is not a stage
          --> r.toml:27:1
           | reward_model = "reward"
           = key: stages.1.reward_model
           = help: reward stages: rm

        1 error
        """),
    case("ppo-ptx-data-unknown",
         QA(SCORED, ('name = "sft"\nkind = "sft"', 'name = "rm"\nkind = "reward"\nobjective = "regression"\n\n'
                     '[[stages]]\nname = "ppo"\nkind = "ppo"\nreward_model = "rm"\nptx_coef = 0.1\nptx_data = "pretrain"')),
         r"""
        error: stage "ppo": ptx_data = "pretrain" is not a data set
          --> r.toml:29:1
           | ptx_data = "pretrain"
           = key: stages.1.ptx_data
           = help: data sets: qa

        1 error
        """),
    case("stage-data-ambiguous", T(add=SECOND_DATA_SET), r"""
        error: stage "sft" does not say which data set it trains on
          --> r.toml:40:3
           | [[stages]]
           = key: stages.0
           = help: add data = "tweets" (one of: tweets, more)

        1 error
        """),
    case("stage-data-unknown", T(('kind = "sft"', 'kind = "sft"\ndata = "tweet"')), r"""
        error: stage "sft": data = "tweet" is not a data set
          --> r.toml:43:1
           | data = "tweet"
           = key: stages.0.data
           = help: did you mean "tweets"?

        1 error
        """),
    case("sft-on-preference-data", QA(*PREFERENCE), r"""
        error: stage "sft" (sft): data set "qa" has no target text to learn (preference); use completion, instruction, chat or columns data
          --> r.toml:21:1
           | kind = "sft"
           = key: stages.0.kind

        1 error
        """),
    case("dpo-on-completion-data", QA(('name = "sft"\nkind = "sft"', 'name = "dpo"\nkind = "dpo"')), r"""
        error: stage "dpo" (dpo): data set "qa" is completion, but dpo needs preference pairs (format = "preference": prompt, chosen, rejected)
          --> r.toml:21:1
           | kind = "dpo"
           = key: stages.0.kind

        1 error
        """),
    case("pairwise-reward-on-completion-data", QA(('name = "sft"\nkind = "sft"', 'name = "rm"\nkind = "reward"')), r"""
        error: stage "rm" (reward): data set "qa" is completion, but a pairwise reward model needs preference pairs (format = "preference": prompt, chosen, rejected); or set objective = "regression"
          --> r.toml:21:1
           | kind = "reward"
           = key: stages.0.kind

        1 error
        """),
    case("regression-reward-without-score",
         QA(('name = "sft"\nkind = "sft"', 'name = "rm"\nkind = "reward"\nobjective = "regression"')), r"""
        error: stage "rm" (reward): data set "qa" has no field "score" to regress on (score_field)
          --> r.toml:21:1
           | kind = "reward"
           = key: stages.0.kind

        1 error
        """),
    case("ppo-on-chat-data", RLHF_TOML, r"""
        error: stage "ppo" (ppo): data set "chats" is openai-chat; ppo samples from prompts: use format = "prompt" (user_input) or another single-turn format
          --> r.toml:30:1
           | data = "chats"
           = key: stages.1.data

        1 error
        """),
    case("global-batch-arithmetic", T(("micro_batch_size = 4", "micro_batch_size = 4\nglobal_batch_size = 16")), r"""
        error: [train]: global_batch_size = 16 but micro_batch_size 4 x grad_accum 1 x 1 process(es) = 4
          --> r.toml:38:1
           | global_batch_size = 16
           = key: train.global_batch_size
           = help: set grad_accum = 4

        1 error
        """),
    case("global-batch-arithmetic-stage-override",
         T(("micro_batch_size = 4", "micro_batch_size = 4\ngrad_accum = 4\nglobal_batch_size = 16"),
           ('kind = "sft"', 'kind = "sft"\nmicro_batch_size = 2')), r"""
        error: stage "sft": global_batch_size = 16 but micro_batch_size 2 x grad_accum 4 x 1 process(es) = 8
          --> r.toml:39:1
           | global_batch_size = 16
           = key: train.global_batch_size
           = help: set grad_accum = 8

        1 error
        """),
    case("warning-high-learning-rate-full-fine-tuning",
         QA(('kind = "lora"', 'kind = "full"'), add="[train]\nlearning_rate = 1e-3"), r"""
        warning: stage "sft": learning_rate = 0.001 is high for full fine-tuning of a pretrained model and may erase what it knows
          --> r.toml:24:1
           | learning_rate = 1e-3
           = key: train.learning_rate
           = help: typical values are 1e-5 to 1e-4

        1 warning
        """, exit=0, subprocess=True),
    case("warning-high-learning-rate-full-fine-tuning-json",
         as_json(QA(('kind = "lora"', 'kind = "full"'), add="[train]\nlearning_rate = 1e-3")), r"""
        warning: stage "sft": learning_rate = 0.001 is high for full fine-tuning of a pretrained model and may erase what it knows
          --> r.json:30:5
           |     "learning_rate": 0.001
           = key: train.learning_rate
           = help: typical values are 1e-5 to 1e-4

        1 warning
        """, file="r.json", exit=0),
    case("warning-high-learning-rate-stage-override",
         QA(('kind = "lora"', 'kind = "full"'), ('kind = "sft"', 'kind = "sft"\nlearning_rate = 2e-4')), r"""
        warning: stage "sft": learning_rate = 0.0002 is high for full fine-tuning of a pretrained model and may erase what it knows
          --> r.toml:22:1
           | learning_rate = 2e-4
           = key: stages.0.learning_rate
           = help: typical values are 1e-5 to 1e-4

        1 warning
        """, exit=0),
    case("warning-high-default-learning-rate", QA(('kind = "lora"', 'kind = "full"')), r"""
        warning: stage "sft": learning_rate = 0.0005 is high for full fine-tuning of a pretrained model and may erase what it knows
          --> r.toml:19:3
           | [[stages]]
           = key: stages.0
           = help: typical values are 1e-5 to 1e-4

        1 warning
        """, exit=0),
    case("stage-adapter-freeze-layers-beyond-model",
         QA(('kind = "sft"', 'kind = "sft"\n\n[stages.adapter]\nkind = "freeze"\ntrainable_layers = 20')), r"""
        error: stages.0.adapter.trainable_layers = 20 but the model has 12 layers (indices 0..11)
          --> r.toml:25:1
           | trainable_layers = 20

        1 error
        """),
    # ------------------------------------------------------------------ checks_data.py: eval
    case("eval-stage-unknown", T(('label_field = "label"', 'label_field = "label"\nstage = "sf"')), r"""
        error: eval.stage = "sf" is not a stage
          --> r.toml:46:1
           | stage = "sf"
           = help: did you mean "sft"?

        1 error
        """),
    case("eval-data-unknown", T(('label_field = "label"', 'label_field = "label"\ndata = "tweet"')), r"""
        error: eval.data = "tweet" is not a data set
          --> r.toml:46:1
           | data = "tweet"
           = help: did you mean "tweets"?

        1 error
        """),
    case("eval-classification-on-chat-data",
         QA(*CHAT, add='[eval]\nkind = "classification"\nlabel_field = "label"'), r"""
        error: eval.kind = "classification" needs labelled rows, but data set "qa" is openai-chat
          --> r.toml:24:1
           | kind = "classification"
           = help: use kind = "language_model"

        error: eval.label_field = "label" is not a field of data set "qa"
          --> r.toml:25:1
           | label_field = "label"
           = help: fields: messages

        2 errors
        """),
    case("eval-label-field-unknown", T(('label_field = "label"', 'label_field = "labels"')), r"""
        error: eval.label_field = "labels" is not a field of data set "tweets"
          --> r.toml:45:1
           | label_field = "labels"
           = help: did you mean "label"?

        1 error
        """, subprocess=True),
    case("eval-label-field-unknown-json", as_json(T(('label_field = "label"', 'label_field = "labels"'))), r"""
        error: eval.label_field = "labels" is not a field of data set "tweets"
          --> r.json:70:5
           |     "label_field": "labels"
           = help: did you mean "label"?

        1 error
        """, file="r.json"),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory holding the data files the recipes name, relative to the recipe."""
    (tmp_path / "tiny.tsv").write_bytes(TINY_TSV.read_bytes())
    (tmp_path / "rows.jsonl").write_text(ROWS_JSONL)
    return tmp_path


def _validate(workdir: Path, file: str, in_subprocess: bool, monkeypatch, capsys) -> tuple[int, str, str]:
    if in_subprocess:
        result = run_cli("validate", file, cwd=workdir)
        return result.returncode, result.stdout, result.stderr
    monkeypatch.chdir(workdir)
    code = main(["validate", file])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "text, file",
    [
        pytest.param(BASE_TOML, "r.toml", id="base-toml"),
        pytest.param(as_json(BASE_TOML), "r.json", id="base-json"),
        pytest.param(QA_TOML, "r.toml", id="qa-toml"),
        pytest.param(as_json(QA_TOML), "r.json", id="qa-json"),
        pytest.param(RLHF_TOML.replace('format = "openai-chat"\ntemplate = { chat = "chatml" }',
                                       'format = "prompt"\ntemplate = { prompt = "{{ user_input }}", completion = ""}'),
                     "r.toml", id="rlhf-toml"),
    ],
)
def test_base_recipes_are_valid(workdir: Path, text: str, file: str, monkeypatch, capsys) -> None:
    """The cases are one or two lines away from these recipes, so these must pass cleanly."""
    (workdir / file).write_text(text)
    code, out, err = _validate(workdir, file, False, monkeypatch, capsys)
    assert (code, out, err) == (0, f"ok: {file}\n", "")


@pytest.mark.parametrize("c", CASES)
def test_validate_snapshot(workdir: Path, c: Case, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    # As with HF_HUB_OFFLINE=1: a hub name the catalog does not know is looked up in the cache only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, text in c.files.items():
        (workdir / name).write_text(text)
    if c.recipe is not None:
        (workdir / c.file).parent.mkdir(parents=True, exist_ok=True)
        (workdir / c.file).write_text(c.recipe, encoding="utf-8")
    code, out, err = _validate(workdir, c.file, c.subprocess, monkeypatch, capsys)
    assert "Traceback" not in err
    assert err == c.expected
    assert code == c.exit
    assert out == (f"ok: {c.file}\n" if c.exit == 0 else "")


def test_cases_have_unique_ids() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))
