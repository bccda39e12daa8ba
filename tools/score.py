"""Score answers with a reward model: a JSONL of prompts and answers, or of preference pairs (then with accuracy).

  pointwise:  {"prompt": "...", "response": "...", "system": "..." (optional)} per line -> one score each
  pairwise:   any shape preprocess_data.py reads (--handler-name, --map-keys) -> chosen and rejected scores,
              and the accuracy (chosen scored above rejected)

  python tools/score.py --load HF_OR_MG_DIR --input data.jsonl --prompt-type llama3 [--output scores.jsonl]

--load is an exported HF `*ForSequenceClassification` folder or a megatron `--stage rm` checkpoint (any layout;
converted to HF in a temporary folder first with the project's converter). Sequences are built exactly as
training builds them (the same template and handlers), right-padded in batches of --batch-size with the
config's pad_token_id; the score is the classifier's logit at each sequence's last token.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# megatron-core warns on import that it falls back from TE/apex; scoring uses neither
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from engine.checkpoint.layout import TRACKER_FILE  # noqa: E402
from engine.data.handlers import RecordError, build_handler  # noqa: E402
from engine.data.preprocess import PreprocessConfig  # noqa: E402
from engine.data.templates import ChatEncoder, Conversation, build_chat_encoder  # noqa: E402
from engine.data.truncation import cut_sequence, truncate_lengths  # noqa: E402
from engine.options import add_options, values_from_args  # noqa: E402
from engine.tokenizer import TokenizerConfig, build_tokenizer  # noqa: E402

log = logging.getLogger("score")

RECORD_FLAGS = ("handler_name", "prompt_type", "prompt_type_path", "map_keys")
"""preprocess_data.py's flags for reading records, declared there once."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--load", required=True, help="HF sequence-classifier folder or megatron RM checkpoint")
    parser.add_argument("--input", required=True, help="JSONL of prompt/response records or of preference pairs")
    parser.add_argument("--output", help="write each record's scores here as JSONL")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--seq-length", type=int, help="cut longer sequences as training does")
    add_options(parser, PreprocessConfig, "records (as preprocess_data.py reads them; pairwise handlers only)",
                only=RECORD_FLAGS)
    add_options(parser, TokenizerConfig, "tokenizer (default: --load's, if it has one)", only=["tokenizer_name_or_path"])
    return parser


def read_sequences(path: str, encoder: ChatEncoder, handler, seq_length: int | None) -> tuple[list, bool]:
    """Token ids per record: [answer] (pointwise) or [chosen, rejected] (pairwise), and whether it is pairwise."""
    records, pairwise = [], None
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            is_pair = "response" not in record
            if pairwise is not None and is_pair != pairwise:
                raise ValueError(f"{path}:{line_number}: mixes pointwise (prompt/response) and pairwise records")
            pairwise = is_pair
            try:
                if is_pair:
                    sample = handler(record)
                    conversation, answers = sample.conversation, [sample.chosen, sample.rejected]
                else:
                    conversation = Conversation(prompt=record["prompt"], system=record.get("system"))
                    answers = [record["response"]]
            except (RecordError, KeyError) as err:
                raise ValueError(f"{path}:{line_number}: {err}") from None
            encoded = encoder.encode(conversation, *answers)  # per answer: ids and prompt length
            if seq_length is not None:
                keep_prompt, keep_answer = truncate_lengths(max(n for _, n in encoded),
                                                            max(len(ids) - n for ids, n in encoded), seq_length)
                encoded = [cut_sequence(ids, n, keep_prompt, keep_answer) for ids, n in encoded]
            records.append([ids for ids, _ in encoded])
    if not records:
        raise ValueError(f"{path}: no records")
    return records, bool(pairwise)


def score_sequences(model, sequences: list[list[int]], batch_size: int) -> list[float]:
    """The classifier's score of each sequence, batched and right-padded with the config's pad token."""
    import torch
    from tqdm import tqdm

    pad = model.config.pad_token_id
    if pad is None and batch_size > 1:
        log.warning("the model config has no pad_token_id: scoring one sequence at a time")
        batch_size = 1
    scores = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="scoring", unit="batch", file=sys.stderr):
        batch = [torch.tensor(s) for s in sequences[start:start + batch_size]]
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad or 0)
        mask = (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in batch]).unsqueeze(1)).long()
        with torch.no_grad():
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def load_classifier(path: Path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"--load {path}: a classifier with {model.config.num_labels} labels, not a reward model")
    return model


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir = Path(args.load)
        if (hf_dir / TRACKER_FILE).exists():  # a megatron checkpoint: its HF export
            from engine.convert.common import ConvertConfig
            from engine.convert.run import run_conversion

            hf_dir = Path(scratch) / "hf"
            run_conversion(ConvertConfig(load_model_type="mg", save_model_type="hf", load_dir=args.load,
                                         save_dir=str(hf_dir)))
        tokenizer_dir = getattr(args, "tokenizer_name_or_path", None) or str(hf_dir)
        records_format = values_from_args(args, PreprocessConfig, RECORD_FLAGS)
        try:
            encoder = build_chat_encoder(records_format["prompt_type"],
                                         build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_dir)),
                                         records_format["prompt_type_path"])
            handler = build_handler(records_format["handler_name"], records_format["map_keys"])
            records, pairwise = read_sequences(args.input, encoder, handler, args.seq_length)
        except (OSError, ValueError) as err:
            print(f"score.py: error: {err}", file=sys.stderr)
            return 1
        scores = score_sequences(load_classifier(hf_dir), [s for record in records for s in record], args.batch_size)
    per_record = len(records[0])
    rows = [scores[i:i + per_record] for i in range(0, len(scores), per_record)]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"chosen_score": row[0], "rejected_score": row[1]} if pairwise
                                   else {"score": row[0]}) + "\n")
    if pairwise:
        accuracy = sum(c > r for c, r in rows) / len(rows)
        print(f"{len(rows)} pairs: accuracy {accuracy:.4f}, mean chosen {sum(c for c, _ in rows) / len(rows):.6g}, "
              f"mean rejected {sum(r for _, r in rows) / len(rows):.6g}")
    else:
        print(f"{len(rows)} answers: mean score {sum(r[0] for r in rows) / len(rows):.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
