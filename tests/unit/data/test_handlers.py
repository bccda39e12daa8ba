"""Handlers: each input shape becomes the same Conversation + answers; bad records name the field."""

import pytest

from engine.data.handlers import RecordError, build_handler
from engine.data.records import Conversation

SYSTEM, HISTORY = "Be brief.", [("hi", "hello")]
EXPECTED = (Conversation(prompt="What is 2+2?", system=SYSTEM, history=HISTORY), "Four.", "Five.")


def as_tuple(sample):
    conv = sample.conversation
    return Conversation(conv.prompt, conv.system, list(conv.history)), sample.chosen, sample.rejected


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


PROMPT_MSGS = msgs(("system", SYSTEM), ("user", "hi"), ("assistant", "hello"), ("user", "What is 2+2?"))

SHAPES = [
    ("AlpacaStylePairwiseHandler", {},
     {"instruction": "What is 2+2?", "input": "", "system": SYSTEM, "history": [["hi", "hello"]],
      "chosen": "Four.", "rejected": "Five."}),
    ("AlpacaStylePairwiseHandler", {"prompt": "question", "query": "ctx", "system": "sys"},
     {"question": "What is", "ctx": "2+2?", "sys": SYSTEM, "history": [["hi", "hello"]],
      "chosen": "Four.", "rejected": "Five."}),
    ("SharegptStylePairwiseHandler", {},
     {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "What is 2+2?"}],
      "chosen": {"from": "gpt", "value": "Four."}, "rejected": {"from": "gpt", "value": "Five."}}),
    ("SharegptStylePairwiseHandler",
     {"messages": "messages", "role_tag": "role", "content_tag": "content", "user_tag": "user",
      "assistant_tag": "assistant"},
     {"messages": PROMPT_MSGS[1:], "system": SYSTEM, "chosen": {"role": "assistant", "content": "Four."},
      "rejected": {"role": "assistant", "content": "Five."}}),
    ("TrlStylePairwiseHandler", {},
     {"prompt": PROMPT_MSGS, "chosen": msgs(("assistant", "Four.")), "rejected": msgs(("assistant", "Five."))}),
    ("TrlStylePairwiseHandler", {},
     {"chosen": PROMPT_MSGS + msgs(("assistant", "Four.")), "rejected": PROMPT_MSGS + msgs(("assistant", "Five."))}),
    # Alpaca pairwise with output: [chosen, rejected] (LLaMA-Factory / MindSpeed-LLM)
    ("AlpacaStylePairwiseHandler", {},
     {"instruction": "What is 2+2?", "input": "", "system": SYSTEM, "history": [["hi", "hello"]],
      "output": ["Four.", "Five."]}),
    # an empty instruction: the input is the prompt
    ("AlpacaStylePairwiseHandler", {},
     {"instruction": "", "input": "What is 2+2?", "system": SYSTEM, "history": [["hi", "hello"]],
      "chosen": "Four.", "rejected": "Five."}),
    # stack-exchange-paired columns (question, response_j better than response_k)
    ("AlpacaStylePairwiseHandler", {"prompt": "question", "query": "", "chosen": "response_j", "rejected": "response_k",
                                    "system": "sys"},
     {"qid": 7, "question": "What is 2+2?", "date": "2023/01/01", "metadata": ["https://x"], "sys": SYSTEM,
      "history": [["hi", "hello"]], "response_j": "Four.", "response_k": "Five."}),
    ("TrlStylePairwiseHandler", {},
     {"prompt": "What is 2+2?", "system": SYSTEM, "history": [["hi", "hello"]], "chosen": "Four.",
      "rejected": "Five."}),
    ("TrlStylePairwiseHandler", {},
     {"messages": PROMPT_MSGS + msgs(("assistant", "Four.")), "rejected_response": "Five."}),
    ("TrlStylePairwiseHandler", {},
     {"system": SYSTEM, "history": [["hi", "hello"]], "query": "What is 2+2?", "response": "Four.",
      "rejected_response": "Five."}),
]


@pytest.mark.parametrize("name,map_keys,record", SHAPES)
def test_every_shape_gives_the_same_sample(name, map_keys, record):
    expected = EXPECTED
    if map_keys.get("query"):
        expected = (Conversation("What is\n2+2?", SYSTEM, HISTORY), "Four.", "Five.")
    assert as_tuple(build_handler(name, map_keys)(record)) == expected


BAD = [
    ("AlpacaStylePairwiseHandler", {"instruction": "q", "rejected": "r"}, "chosen", "missing required key"),
    ("AlpacaStylePairwiseHandler", {"instruction": "q", "chosen": "  ", "rejected": "r"}, "chosen", "is empty"),
    ("AlpacaStylePairwiseHandler", {"instruction": "q", "chosen": "c", "rejected": 3}, "rejected",
     "must be a string, got int"),
    ("AlpacaStylePairwiseHandler", {"instruction": "q", "chosen": "c", "rejected": "r", "history": [["a"]]},
     "history", "list of \\[query, answer\\]"),
    ("SharegptStylePairwiseHandler", {"conversations": [{"from": "gpt", "value": "x"}], "chosen": "c",
                                      "rejected": "r"}, "conversations", "roles must alternate"),
    ("SharegptStylePairwiseHandler", {"conversations": [{"from": "human", "value": "x"}],
                                      "chosen": {"from": "human", "value": "c"}, "rejected": "r"}, "chosen",
     "must be an 'gpt' message"),
    ("TrlStylePairwiseHandler", {"chosen": "c", "rejected": "r"}, "prompt", "missing: chosen and rejected"),
    ("TrlStylePairwiseHandler", {"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "is empty"),
    ("TrlStylePairwiseHandler", {"chosen": msgs(("user", "q"), ("assistant", "a")),
                                 "rejected": msgs(("user", "q"), ("assistant", "a"), ("user", "q2"),
                                                  ("assistant", "b"))},
     "chosen", "longest common message prefix with the other answer: 2 messages\) followed by one assistant"),
    ("AlpacaStylePairwiseHandler", {"instruction": "q", "output": ["c"]}, "output", "list of two strings"),
    ("AlpacaStylePairwiseHandler", {"instruction": "q", "output": ["c", " "]}, "output", "holds an empty answer"),
    ("AlpacaStylePairwiseHandler", {"instruction": " ", "input": "", "chosen": "c", "rejected": "r"}, "instruction",
     "is empty, and so is the input"),
    ("AlpacaStylePairwiseHandler", {"chosen": "c", "rejected": "r"}, "instruction", "missing required key"),
]


@pytest.mark.parametrize("name,record,field,message", BAD)
def test_bad_records_name_the_field(name, record, field, message):
    with pytest.raises(RecordError, match=message) as info:
        build_handler(name)(record)
    assert info.value.field == field


def test_unknown_map_keys_are_rejected_and_tags_are_not_columns():
    with pytest.raises(ValueError, match="--map-keys: \\['question'\\] are not fields"):
        build_handler("AlpacaStylePairwiseHandler", {"question": "q"})
    handler = build_handler("SharegptStylePairwiseHandler",
                            {"user_tag": "user", "messages": "msgs", "system": "", "chosen": "chosen"})
    assert handler.explicit_columns == {"messages": "msgs"}


def test_disabled_column_is_ignored():
    handler = build_handler("AlpacaStylePairwiseHandler", {"query": "", "system": ""})
    sample = handler({"instruction": "q", "input": "ignored", "system": "ignored", "chosen": "c", "rejected": "r"})
    assert (sample.conversation.prompt, sample.conversation.system) == ("q", None)


def test_trl_implicit_prompt_is_the_longest_common_message_prefix():
    """As TRL's extract_prompt: the shared messages (system, history, final user turn) are the prompt."""
    prompt = msgs(("system", SYSTEM), ("user", "hi"), ("assistant", "hello"), ("user", "What is 2+2?"))
    record = {"chosen": prompt + msgs(("assistant", "Four.")), "rejected": prompt + msgs(("assistant", "Five."))}
    assert as_tuple(build_handler("TrlStylePairwiseHandler")(record)) == EXPECTED
    same = {"chosen": prompt + msgs(("assistant", "Four.")), "rejected": prompt + msgs(("assistant", "Four."))}
    sample = build_handler("TrlStylePairwiseHandler")(same)  # identical: the last message is the answer
    assert (sample.conversation.prompt, sample.chosen, sample.rejected) == ("What is 2+2?", "Four.", "Four.")


def test_reject_reasons_are_named():
    cases = [({"instruction": "q", "rejected": "r"}, "missing_field"),
             ({"instruction": "q", "chosen": " ", "rejected": "r"}, "empty_field"),
             ({"instruction": "q", "chosen": 1, "rejected": "r"}, "invalid_field")]
    for record, reason in cases:
        with pytest.raises(RecordError) as info:
            build_handler("AlpacaStylePairwiseHandler")(record)
        assert info.value.reason == reason
