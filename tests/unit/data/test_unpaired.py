"""Unpaired (KTO) data: preprocessing, --unpair, bad input, KL pairing, block sampling and the completions view."""

import json

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from engine.data.collate import collate_pairs
from engine.data.preprocess import PreprocessConfig, preprocess
from engine.data.readers import DataError
from engine.data.records import Conversation
from engine.data.templates import build_chat_encoder
from engine.data.unpaired import BlockBatchSampler, MismatchedPairs, UnpairedDataset, collate_unpaired
from engine.formats import IGNORE_INDEX, UNPAIRED_KEYS, missing_shards_message, output_path_prefix
from engine.tokenizer import TokenizerConfig

RECORDS = [
    {"prompt": "What is 2 + 2?", "completion": "It is 4.", "label": True},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}],
     "completion": [{"role": "assistant", "content": "Berlin, I think, or maybe Madrid."}], "label": False},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], "label": True},
    {"messages": [{"role": "user", "content": "Count to three."}], "completion": "One, two, four.", "label": False},
]
CONVERSATIONS = [Conversation("What is 2 + 2?"), Conversation("Capital of France?", "Be terse."),
                 Conversation("Say hi."), Conversation("Count to three.")]
ANSWERS = ["It is 4.", "Berlin, I think, or maybe Madrid.", "Hi!", "One, two, four."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run(tmp_path, tokenizer_dir, records, name="out", **kwargs):
    config = PreprocessConfig(input=write_jsonl(tmp_path / f"{name}.jsonl", records),
                              output_prefix=str(tmp_path / "shards" / name),
                              tokenizer=TokenizerConfig(tokenizer_name_or_path=tokenizer_dir), prompt_type="llama3",
                              **{"handler_name": "UnpairedHandler", **kwargs})
    return preprocess(config), config.output_prefix


def read_back(prefix):
    return {k: IndexedDataset(output_path_prefix(prefix, k)) for k in UNPAIRED_KEYS}


def test_unpaired_records_read_back_through_the_template(tmp_path, llama3_dir, llama3_tokenizer):
    summary, prefix = run(tmp_path, llama3_dir, RECORDS, workers=2)
    data = read_back(prefix)
    chat = build_chat_encoder("llama3", llama3_tokenizer)
    assert summary.pairs_written == 4 and summary.unit == "samples" and summary.chosen.count == 2
    for i, (conv, answer, record) in enumerate(zip(CONVERSATIONS, ANSWERS, RECORDS)):
        [(ids, prompt)] = chat.encode(conv, answer)
        assert data["completion_input_ids"][i].tolist() == ids
        labels = data["completion_labels"][i]
        assert (labels[:prompt] == IGNORE_INDEX).all() and (labels[prompt:] != IGNORE_INDEX).all()
        assert data["desirable"][i].tolist() == [int(record["label"])]
    assert missing_shards_message(prefix, UNPAIRED_KEYS) is None
    assert "no preprocessed unpaired files" in missing_shards_message(str(tmp_path / "nothing"), UNPAIRED_KEYS)


def test_unpair_turns_each_pair_into_a_desirable_and_an_undesirable_sample(tmp_path, llama3_dir, llama3_tokenizer):
    pairs = [{"instruction": f"Q{i}?", "chosen": f"Good {i}.", "rejected": f"Bad answer {i}, long."} for i in range(3)]
    _, prefix = run(tmp_path, llama3_dir, pairs, handler_name="AlpacaStylePairwiseHandler", unpair=True,
                    seq_length=16)
    data = read_back(prefix)
    chat = build_chat_encoder("llama3", llama3_tokenizer)
    assert [data["desirable"][i][0] for i in range(6)] == [1, 0, 1, 0, 1, 0]
    for i, pair in enumerate(pairs):
        for k, side in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
            [(full, _)] = chat.encode(Conversation(pair["instruction"]), pair[side])
            assert len(data["completion_input_ids"][k]) == min(len(full), 16)
            assert data["completion_input_ids"][k][-1] == full[-1] or len(full) > 16


@pytest.mark.parametrize("record, field, message", [
    ({"prompt": "Hi", "completion": "Yo"}, "label", "missing required key"),
    ({"prompt": "Hi", "completion": "Yo", "label": "yes"}, "label", "must be true"),
    ({"prompt": "Hi", "label": True}, "completion", "missing required key"),
    ({"prompt": "  ", "completion": "Yo", "label": True}, "prompt", "is empty"),
    ({"messages": [{"role": "user", "content": "Hi"}], "label": True}, "messages", "must end with the labelled"),
])
def test_bad_records_name_file_line_and_field(tmp_path, llama3_dir, record, field, message):
    with pytest.raises(DataError, match=rf"out\.jsonl:2: field '{field}': {message}"):
        run(tmp_path, llama3_dir, [RECORDS[0], record])


def test_unpair_needs_a_pairwise_handler(tmp_path, llama3_dir):
    with pytest.raises(ValueError, match="--unpair turns pairwise records"):
        run(tmp_path, llama3_dir, RECORDS, unpair=True)


@pytest.fixture(scope="module")
def samples(tmp_path_factory, llama3_dir):
    tmp_path = tmp_path_factory.mktemp("unpaired")
    records = [{"prompt": f"Prompt number {i}", "completion": "x" * (i + 1), "label": i % 3 == 0} for i in range(10)]
    return UnpairedDataset(run(tmp_path, llama3_dir, records)[1], seq_length=64)


def test_kl_completions_rotate_within_blocks_and_keep_their_own_prompt(samples):
    pairs = MismatchedPairs(samples, block=4, seq_length=64, seed=3)
    assert len(pairs) == 12  # 10 samples cycled to three whole blocks
    assert sorted(pairs.order[:10].tolist()) == list(range(10))
    for j in range(len(pairs)):
        item, k = pairs[j], pairs.partner(j)
        assert k // 4 == j // 4 and (k != j)
        own, other = samples[int(pairs.order[j])], samples[int(pairs.order[k])]
        p, q = own["prompt_length"], other["prompt_length"]
        assert item["rejected_input_ids"].tolist() == own["input_ids"][:p].tolist() + other["input_ids"][q:].tolist()
        assert (item["rejected_labels"][:p] == IGNORE_INDEX).all()
        assert item["chosen_input_ids"].tolist() == own["input_ids"].tolist() and item["desirable"] == own["desirable"]
    # a block's KL completions are exactly its completions, each with another prompt
    block = [pairs[j] for j in range(4)]
    answers = lambda key: sorted(tuple(b[key][b[key] != IGNORE_INDEX].tolist()) for b in block)
    assert answers("chosen_labels") == answers("rejected_labels")
    # a KL sequence longer than --seq-length is cut by the pairwise rule
    short = MismatchedPairs(samples, block=4, seq_length=8, seed=3)
    assert all(len(short[j]["rejected_input_ids"]) <= 8 for j in range(12))


def test_block_sampler_gives_each_micro_batch_one_block_on_every_layout():
    one = BlockBatchSampler(12, 4, 2, 0, 1, seed=5)
    batches = [next(iter(one)) for _ in range(1)]
    ranks = [iter(BlockBatchSampler(12, 4, 2, r, 2, seed=5)) for r in range(2)]
    first = next(iter(BlockBatchSampler(12, 4, 2, 0, 1, seed=5)))
    assert [m for it in ranks for m in next(it)] == first == batches[0]
    assert all(len(m) == 2 and m[0] % 2 == 0 and m[1] == m[0] + 1 for m in first)
    resumed = iter(BlockBatchSampler(12, 4, 2, 0, 1, seed=5, consumed_samples=4))
    stream = iter(BlockBatchSampler(12, 4, 2, 0, 1, seed=5))
    next(stream)
    assert next(resumed) == next(stream)


@pytest.mark.parametrize("packed", [False, True])
def test_completions_view_holds_the_completions_alone(samples, packed):
    pairs = MismatchedPairs(samples, block=4, seq_length=64, seed=3)
    items = [pairs[j] for j in range(4)]
    batch = collate_unpaired(items, pad_to_multiple_of=8, packed=packed)
    view = batch.completions()
    alone = collate_pairs([{"chosen_input_ids": s["chosen_input_ids"], "chosen_labels": s["chosen_labels"],
                            "rejected_input_ids": s["chosen_input_ids"], "rejected_labels": s["chosen_labels"]}
                           for s in items], 8)
    assert batch.desirable.tolist() == [s["desirable"] for s in items]
    for k, s in enumerate(items):
        n = len(s["chosen_input_ids"])
        if packed:
            start = int(view.cu_seqlens[k])
            where = view.sequence_ids[0] == k
            assert view.tokens[0, start:start + n].tolist() == s["chosen_input_ids"].tolist()
            assert view.labels[0][where].tolist() == alone.labels[k, :n].tolist()
        else:
            assert view.tokens[k, :n].tolist() == s["chosen_input_ids"].tolist()
            assert view.labels[k].tolist()[:alone.labels.shape[1]] == alone.labels[k].tolist()
    if packed:
        assert view.tokens.shape[1] % 8 == 0 and int(view.cu_seqlens[-1]) == view.tokens.shape[1]
        assert (view.labels[0][view.sequence_ids[0] < 0] == IGNORE_INDEX).all()
        assert sum(view.seq_lengths) == view.tokens.shape[1]
    assert torch.equal(view.padding, view.sequence_ids < 0) if packed else \
        torch.equal(view.padding, batch.padding[:4])  # what an MoE model's routers leave out
    assert int((view.labels != IGNORE_INDEX).sum()) == int((alone.labels[:4] != IGNORE_INDEX).sum())
    assert torch.equal(batch.to(torch.device("cpu")).desirable, batch.desirable)


def test_bad_desirable_file_is_named(tmp_path, samples):
    prefix = str(tmp_path / "bad")
    for key in UNPAIRED_KEYS:
        source = output_path_prefix(samples.prefix, key)
        for ext in (".bin", ".idx"):
            data = open(source + ext, "rb").read()
            open(output_path_prefix(prefix, key) + ext, "wb").write(data)
    flags = np.memmap(output_path_prefix(prefix, "desirable") + ".bin", dtype=np.int32, mode="r+")
    flags[3] = 7
    flags.flush()
    with pytest.raises(DataError, match=r"desirable_document\.bin: sample 3: value 7"):
        UnpairedDataset(prefix, 64)


def test_throughput_counts_each_completion_once_with_its_labelled_positions(samples):
    """KTO's FLOPs per sample: the completion's tokens and the answer positions the output layer runs on (the KL
    completion runs without gradient, outside the trained sequences)."""
    from engine.arguments import parse_args
    from engine.data.kinds import UnpairedData

    config = parse_args(("--stage kto --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 "
                         "--max-position-embeddings 64 --vocab-size 128 --micro-batch-size 4").split(), world_size=1)
    item = MismatchedPairs(samples, block=4, seq_length=64, seed=3)[0]
    labelled = int((item["chosen_labels"][1:] != IGNORE_INDEX).sum())
    assert 0 < labelled < len(item["chosen_input_ids"]) - 1
    assert UnpairedData(config).sequence_lengths(item) == [(len(item["chosen_input_ids"]), labelled)]
