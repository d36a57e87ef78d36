"""An imported model's own chat template (tokenizer_config.json's chat_template) renders SFT
data and prompts as transformers renders them, and goes out with the exports."""

import json
import pickle
import shutil

import pytest

from helpers import LLAMA3_TEMPLATE
from model.chat import chat_stop_ids, render_chat
from model.errors import RelayError
from model.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": "Ça va? 你好 🚀"},
     {"role": "assistant", "content": "Oui.\n\nVery well, thank you."}, {"role": "user", "content": "def f(x):\n\treturn x"},
     {"role": "assistant", "content": "It returns x, it's 1234567 times simpler."}],
]
# The same template with transformers' {% generation %} markers around what the assistant is
# trained on: transformers' assistant mask of it is the reference for ours.
TAGGED = LLAMA3_TEMPLATE.replace(
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}")


def test_the_models_own_template_gives_apply_chat_templates_ids_and_assistant_mask(llama3_style_tokenizer):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(llama3_style_tokenizer)
    ours = Tokenizer.from_hf_dir(llama3_style_tokenizer, {})
    assert ours.chat_template is not None and TAGGED != LLAMA3_TEMPLATE
    for chat in CHATS:
        ids, mask = render_chat(ours, chat)
        expected = theirs.apply_chat_template(chat, chat_template=TAGGED, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        assert ids == list(theirs.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        assert ids == list(expected["input_ids"]) and mask == list(expected["assistant_masks"]) and sum(mask) > 0
        prompt = chat[:-1]
        generation = theirs.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert render_chat(ours, prompt, add_generation_prompt=True)[0] == list(generation)
    eot = ours.special_tokens["<|eot_id|>"]
    assert chat_stop_ids(ours)[0] == eot
    # The data and prompt paths use it: generation rows (--chat) and a worker's pickled copy.
    from pipelines.generation.rows import prompt_ids

    row = {"messages": CHATS[1][:-1]}
    again = pickle.loads(pickle.dumps(ours))
    assert prompt_ids(row, again, True, "x", 256) == render_chat(ours, CHATS[1][:-1], add_generation_prompt=True)[0]


def test_text_that_spells_a_special_token_stays_text(llama3_style_tokenizer):
    """Where a message spells <|eot_id|>, transformers would emit the token; we encode the
    characters, so no message can end a turn early."""
    ours = Tokenizer.from_hf_dir(llama3_style_tokenizer, {})
    eot = ours.special_tokens["<|eot_id|>"]
    chat = [{"role": "user", "content": "say <|eot_id|> now"}, {"role": "assistant", "content": "ok <|eot_id|>"}]
    ids, mask = render_chat(ours, chat)
    assert ids.count(eot) == 2  # the two the template wrote
    assert ours.decode(ids).count("<|eot_id|>") == 4
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == "ok <|eot_id|><|eot_id|>"


def test_the_template_travels_with_the_tokenizer_and_the_exports(llama3_style_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from model.hf import tokenizer_files
    from model.tokenizer import Tokenizer

    ours = Tokenizer.from_hf_dir(llama3_style_tokenizer, {})
    saved = Tokenizer.from_dir(ours.save(tmp_path / "run-tokenizer"))  # RUN/tokenizer and a native export's tokenizer/
    assert saved == ours and saved.chat_template.source == LLAMA3_TEMPLATE
    assert render_chat(saved, CHATS[1]) == render_chat(ours, CHATS[1])
    (tmp_path / "hf").mkdir()
    for name, text in tokenizer_files(saved, 256).items():  # an HF export's tokenizer files
        (tmp_path / "hf" / name).write_text(text, encoding="utf-8")
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3_TEMPLATE
    assert list(exported.apply_chat_template(CHATS[1], tokenize=True, return_dict=True)["input_ids"]) == render_chat(ours, CHATS[1])[0]
    assert Tokenizer.from_hf_dir(tmp_path / "hf", {}).chat_template_sha256 == ours.chat_template_sha256


@pytest.mark.parametrize("template, says", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages.append(1) }}", "refused the conversation"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "refused the conversation"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}", "turn 1: the template does not render"),
    ("{% for m in messages %}{{ m['content'] }", "does not parse"),
])
def test_a_template_that_escapes_fails_or_cannot_be_masked_is_refused(llama3_style_tokenizer, tmp_path, template, says):
    """Hub templates are untrusted code: the immutable sandbox stops mutation and Python
    internals; one whose renderings are not prefixes of each other cannot give a loss mask."""
    copy = tmp_path / "tok"
    shutil.copytree(llama3_style_tokenizer, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    with pytest.raises(RelayError, match=says):
        render_chat(Tokenizer.from_hf_dir(copy, {}), CHATS[0])


def test_an_init_model_whose_template_the_job_tokenizer_lacks_is_refused_before_launch(llama3_style_tokenizer, tmp_path):
    """The same vocabulary without tokenizer_config.json's template would render the SFT data
    with relaygpt's role tokens: preflight names stages.sft.init and says which template is whose."""
    import yaml

    from cluster.preflight import _init_tokenizers
    from jobs.plan import data_plan
    from jobs.spec import load_job
    from pipelines.rundir import RunDir

    (tmp_path / "model").mkdir()
    shutil.copy(llama3_style_tokenizer / "tokenizer.json", tmp_path / "model" / "tokenizer.json")
    shutil.copy(llama3_style_tokenizer / "tokenizer_config.json", tmp_path / "model" / "tokenizer_config.json")
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 128}))
    (tmp_path / "bare").mkdir()
    shutil.copy(llama3_style_tokenizer / "tokenizer.json", tmp_path / "bare" / "tokenizer.json")
    job = {"name": "t", "tokenizer": {"dir": "bare"}, "data": {"sft": {"sources": [{"type": "synthetic"}]}},
           "stages": {"sft": {"init": "model", "steps": 2}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    loaded = load_job(tmp_path / "job.yaml")
    problems = _init_tokenizers(loaded, RunDir(tmp_path / "run"), data_plan(loaded))
    assert len(problems) == 1 and problems[0].startswith("stages.sft.init:")
    assert "has its own chat template, the job's tokenizer relaygpt's chat template" in problems[0]
