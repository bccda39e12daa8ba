"""Pairwise preprocessing: records -> tokenized pairs -> megatron indexed shards.

Reading and writing stay in the calling process; decoding, JSON parsing,
tokenizing and truncation run in ``--workers`` processes whose results come
back in input order (``imap``), so the output is byte-identical for any number
of workers. Shards are written under temporary names and renamed only when the
whole input went through, so a failed run leaves no output files. A run holds a
lock on its prefix, so it can tell staging files of a killed run (removed, and
logged) from those of a live one; an existing data set is replaced only with
``--overwrite``.

Output: ``PREFIX_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx}``
(int32); document i of each is pair i; labels are input_ids with prompt
positions set to -100 (aligned, not shifted: the trainer shifts). Chosen and
rejected share their prompt ids unless a token straddles the prompt/answer
boundary differently in the two (engine/data/templates.py): then each keeps its
own exact prompt, and the summary counts such pairs. Unpaired (KTO) data, from
``--handler-name UnpairedHandler`` or pairwise records with ``--unpair``, goes
the same way into
``PREFIX_packed_{completion_input_ids,completion_labels,desirable}_document``
(engine/data/unpaired.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from engine.data.handlers import HANDLERS, RecordError, build_handler
from engine.data.readers import DataError, Source, find_sources, first_record_columns, read_records, total_bytes
from engine.data.templates import build_chat_encoder
from engine.data.truncation import cut_sequence, truncate_lengths
from engine.data.unpaired import UNPAIRED_HANDLERS, unpair
from engine.file_lock import lock_or_holder
from engine.formats import IGNORE_INDEX, MARGIN_KEY, OUTPUT_KEYS, UNPAIRED_KEYS, output_path_prefix
from engine.options import Section, add_options, option, require, section_from_args
from engine.tokenizer import TokenizerConfig, add_tokenizer_args, build_tokenizer

logger = logging.getLogger(__name__)

CHUNK_SIZE = 32
"""Records per worker task: large enough to amortise IPC, small enough to keep workers busy."""
MAX_LISTED_BAD = 10
WRITE_BUFFER = 1 << 20


def json_object(text: str) -> dict[str, str]:
    """argparse type of --map-keys: a JSON object of strings."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise argparse.ArgumentTypeError("must be a JSON object of strings, e.g. '{\"prompt\": \"question\"}'")
    return value


@dataclass
class PreprocessConfig(Section):
    """Everything one preprocessing run needs (MindSpeed-LLM flag names)."""

    input: str = option(help="a JSONL, JSON-array, parquet or Arrow file, a directory/glob of them, or a folder "
                             "written by datasets' save_to_disk")
    output_prefix: str = option(help="OUT/name; files are OUT/name_packed_*_document.{bin,idx}")
    tokenizer: TokenizerConfig = option(cli=False, help="the tokenizer flags")
    handler_name: str = option("AlpacaStylePairwiseHandler", "input data shape; UnpairedHandler: unpaired (KTO) "
                                                              "records {prompt or messages, completion, label}",
                               choices=sorted({**HANDLERS, **UNPAIRED_HANDLERS}))
    unpair: bool = option(False, "write unpaired (KTO) data from pairwise records: each pair becomes two samples, "
                                 "its chosen answer desirable and its rejected answer undesirable")
    prompt_type: str = option("empty", "chat template: a name from engine/data/templates.json, or 'auto' for the "
                                       "tokenizer's own chat template (HF chat_template, rendered by transformers)")
    prompt_type_path: str | None = option(None, "JSON file of extra templates (same schema as templates.json)")
    map_keys: dict[str, str] = option(default_factory=dict, type=json_object,
                                      help="logical field -> column name ('' disables a column), as JSON, "
                                           "e.g. '{\"prompt\":\"question\",\"query\":\"\"}'")
    seq_length: int | None = option(None, "longest chosen/rejected sequence to write; longer pairs are "
                                          "truncated (or dropped with --drop-long)")
    drop_long: bool = option(False, "drop pairs longer than --seq-length instead of truncating them")
    workers: int = option(1, "tokenizing processes (1 = in the calling process)")
    log_interval: int = option(1000, "log progress every this many records")
    skip_bad_records: bool = option(False, "skip and count malformed records instead of stopping")
    overwrite: bool = option(False, "replace an existing data set at --output-prefix (without it, that is an "
                                    "error); the old one is kept until the new one is complete")

    def check(self) -> None:
        require(bool(self.output_prefix) and not self.output_prefix.endswith(os.sep),
                f"--output-prefix must name files (OUT/name), got {self.output_prefix!r}")
        require(isinstance(self.map_keys, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in self.map_keys.items()),
                "--map-keys must be a JSON object of strings")
        require(self.seq_length is None or self.seq_length >= 2,
                f"--seq-length must be at least 2, got {self.seq_length}")
        require(not self.drop_long or self.seq_length is not None, "--drop-long needs --seq-length")
        require(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        require(not (self.unpair and self.handler_name in UNPAIRED_HANDLERS),
                f"--unpair turns pairwise records into unpaired ones; --handler-name {self.handler_name} reads "
                "unpaired records already")
        require(self.log_interval >= 1, f"--log-interval must be >= 1, got {self.log_interval}")
        require(self.prompt_type_path is None or os.path.isfile(self.prompt_type_path),
                f"--prompt-type-path {self.prompt_type_path!r} is not a file")

    @property
    def unpaired(self) -> bool:
        """The run writes unpaired (KTO) shards."""
        return self.unpair or self.handler_name in UNPAIRED_HANDLERS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PreprocessConfig:
        return section_from_args(cls, args, tokenizer=TokenizerConfig.from_args(args))


def add_preprocess_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``data`` and ``tokenizer`` groups."""
    add_options(parser, PreprocessConfig, "data")
    add_tokenizer_args(parser)
    return parser


class EncodedPair(NamedTuple):
    source: int
    index: int
    chosen: bytes
    """int32 ids of prompt + chosen answer."""
    rejected: bytes
    chosen_prompt: int
    """Prompt tokens kept in the chosen sequence (masked)."""
    rejected_prompt: int
    lengths: tuple[int, int, int]
    """Prompt, chosen answer and rejected answer tokens before truncation."""
    truncated: str | None
    """``prompt``, ``answers`` or ``prompt_and_answers`` when the pair was cut to --seq-length."""
    shared_prompt: bool
    """Whether chosen and rejected have the same prompt ids (see the module docstring)."""
    identical: bool
    margin: float | None = None
    """The pair's margin column (--map-keys margin), if mapped."""


class UnpairedDocument(NamedTuple):
    ids: bytes
    """int32 ids of prompt + completion."""
    prompt: int
    """Prompt tokens kept (masked)."""
    desirable: bool
    lengths: tuple[int, int]
    """Prompt and completion tokens before truncation."""
    truncated: str | None


class EncodedUnpaired(NamedTuple):
    source: int
    index: int
    documents: list[UnpairedDocument]
    """One per sample of the record (two under --unpair)."""


class RecordFailure(NamedTuple):
    source: int
    index: int
    reason: str
    """``too_long`` (dropped) or one of ``engine.data.records.REJECT_REASONS`` (rejected)."""
    field: str | None
    message: str


class PairEncoder:
    """Record -> EncodedPair or RecordFailure; one per process."""

    def __init__(self, config: PreprocessConfig) -> None:
        if config.handler_name in UNPAIRED_HANDLERS:
            self.handler = UNPAIRED_HANDLERS[config.handler_name](config.map_keys)
        else:
            self.handler = build_handler(config.handler_name, config.map_keys)
        self.chat = build_chat_encoder(config.prompt_type, build_tokenizer(config.tokenizer), config.prompt_type_path)
        self.seq_length = config.seq_length
        self.drop_long = config.drop_long

    def __call__(self, item: tuple[int, int, bytes | dict]) -> EncodedPair | RecordFailure:
        source, index, payload = item
        try:
            record = _parse(payload)
            sample = self.handler(record)
            margin = self.handler.margin(record)
            (chosen, n_chosen), (rejected, n_rejected) = self.chat.encode(sample.conversation, sample.chosen,
                                                                          sample.rejected)
        except RecordError as e:
            return RecordFailure(source, index, e.reason, e.field, str(e))
        shared = n_chosen == n_rejected and chosen[:n_chosen] == rejected[:n_rejected]
        prompt, answer = max(n_chosen, n_rejected), max(len(chosen) - n_chosen, len(rejected) - n_rejected)
        lengths = (prompt, len(chosen) - n_chosen, len(rejected) - n_rejected)
        truncated = None
        if self.seq_length is not None and max(len(chosen), len(rejected)) > self.seq_length:
            if self.drop_long:
                return RecordFailure(source, index, "too_long", None,
                                     f"{max(len(chosen), len(rejected))} tokens > --seq-length")
            keep_prompt, keep_answer = truncate_lengths(prompt, answer, self.seq_length)
            truncated = _truncation(prompt, answer, keep_prompt, keep_answer)
            chosen, n_chosen = cut_sequence(chosen, n_chosen, keep_prompt, keep_answer)
            rejected, n_rejected = cut_sequence(rejected, n_rejected, keep_prompt, keep_answer)
        return EncodedPair(source, index, np.asarray(chosen, dtype=np.int32).tobytes(),
                           np.asarray(rejected, dtype=np.int32).tobytes(), n_chosen, n_rejected, lengths, truncated,
                           shared, sample.chosen == sample.rejected, margin)


    def writer(self, output_prefix: str, overwrite: bool) -> PairShardWriter:
        return PairShardWriter(output_prefix, overwrite, margins=self.handler.has_margin)

    @staticmethod
    def write(result: EncodedPair, writer: PairShardWriter, summary: PreprocessSummary, where: str) -> int:
        """Adds a result to the shards and the summary (logging the first odd pairs); returns the tokens written."""
        chosen = np.frombuffer(result.chosen, dtype=np.int32)
        rejected = np.frombuffer(result.rejected, dtype=np.int32)
        writer.add(chosen, rejected, result.chosen_prompt, result.rejected_prompt, result.margin)
        summary.pairs_written += 1
        if result.truncated:
            summary.truncated[result.truncated] = summary.truncated.get(result.truncated, 0) + 1
        if result.identical:
            summary.identical += 1
            if summary.identical <= MAX_LISTED_BAD:
                logger.warning("%s: chosen == rejected", where)
        if not result.shared_prompt:
            summary.prompt_not_shared += 1
            if summary.prompt_not_shared <= MAX_LISTED_BAD:
                logger.warning("%s: chosen and rejected prompt ids differ (a token straddles the boundary)", where)
        prompt, chosen_answer, rejected_answer = result.lengths
        for name, n in (("prompt", prompt), ("chosen answer", chosen_answer), ("rejected answer", rejected_answer),
                        ("pair", prompt + max(chosen_answer, rejected_answer))):
            summary.length(name).add(n)
        summary.prompt.add(result.chosen_prompt)
        summary.chosen.add(chosen.size)
        summary.rejected.add(rejected.size)
        return chosen.size + rejected.size


def _truncation(prompt: int, answer: int, keep_prompt: int, keep_answer: int) -> str:
    """What truncation cut: the summary's reason."""
    return {(True, False): "prompt", (False, True): "answers"}.get((keep_prompt < prompt, keep_answer < answer),
                                                                    "prompt_and_answers")


class UnpairedEncoder(PairEncoder):
    """Record -> EncodedUnpaired (one sample, or a pair's two under --unpair) or RecordFailure; each sample
    is tokenized by the same rule and truncated on its own by the pairwise rule (its completion as the
    longest answer)."""

    def __init__(self, config: PreprocessConfig) -> None:
        super().__init__(config)
        self.unpair = config.unpair
        if self.handler.has_margin:
            raise ValueError("--map-keys margin: a per-pair reward margin (--stage rm) needs pairwise data; unpaired "
                             "samples have no pair")

    def __call__(self, item: tuple[int, int, bytes | dict]) -> EncodedUnpaired | RecordFailure:
        source, index, payload = item
        try:
            sample = self.handler(_parse(payload))
            samples = unpair(sample) if self.unpair else sample
            encoded = [self.chat.encode(s.conversation, s.completion)[0] for s in samples]
        except RecordError as e:
            return RecordFailure(source, index, e.reason, e.field, str(e))
        documents = []
        for s, (ids, prompt) in zip(samples, encoded):
            completion, truncated = len(ids) - prompt, None
            if self.seq_length is not None and len(ids) > self.seq_length:
                if self.drop_long:
                    return RecordFailure(source, index, "too_long", None, f"{len(ids)} tokens > --seq-length")
                keep_prompt, keep_completion = truncate_lengths(prompt, completion, self.seq_length)
                truncated = _truncation(prompt, completion, keep_prompt, keep_completion)
                ids, kept = cut_sequence(ids, prompt, keep_prompt, keep_completion)
            else:
                kept = prompt
            documents.append(UnpairedDocument(np.asarray(ids, dtype=np.int32).tobytes(), kept, s.desirable,
                                              (prompt, completion), truncated))
        return EncodedUnpaired(source, index, documents)

    def writer(self, output_prefix: str, overwrite: bool) -> UnpairedShardWriter:
        return UnpairedShardWriter(output_prefix, overwrite)

    @staticmethod
    def write(result: EncodedUnpaired, writer: UnpairedShardWriter, summary: PreprocessSummary, where: str) -> int:
        """Adds a result to the shards and the summary (desirable samples as `chosen`, undesirable as
        `rejected`); returns the tokens written."""
        tokens = 0
        for doc in result.documents:
            ids = np.frombuffer(doc.ids, dtype=np.int32)
            writer.add(ids, doc.prompt, doc.desirable)
            summary.pairs_written += 1
            if doc.truncated:
                summary.truncated[doc.truncated] = summary.truncated.get(doc.truncated, 0) + 1
            for name, n in zip(("prompt", "completion", "sample"), (*doc.lengths, sum(doc.lengths))):
                summary.length(name).add(n)
            summary.prompt.add(doc.prompt)
            (summary.chosen if doc.desirable else summary.rejected).add(ids.size)
            tokens += ids.size
        return tokens


def _parse(payload: bytes | dict) -> dict:
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"not valid UTF-8 (byte 0x{payload[e.start]:02x} at column {e.start + 1})",
                              reason="not_utf8") from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"malformed JSON: {e.msg} (column {e.colno})", reason="malformed_json") from None
    if not isinstance(payload, dict):
        raise RecordError(f"a record must be a JSON object, got {type(payload).__name__}", reason="not_an_object")
    return payload


def build_encoder(config: PreprocessConfig) -> PairEncoder:
    return UnpairedEncoder(config) if config.unpaired else PairEncoder(config)


_worker_encoder: PairEncoder | None = None
"""The pool worker's own encoder, set once by ``_init_worker`` (never used in the parent)."""


def _init_worker(encoder: PairEncoder | PreprocessConfig) -> None:
    """Forked workers inherit the parent's encoder (no tokenizer reload); spawned ones build their own."""
    global _worker_encoder
    _worker_encoder = encoder if isinstance(encoder, PairEncoder) else build_encoder(encoder)


def _encode_in_worker(item):
    return _worker_encoder(item)


@dataclass
class LengthStats:
    """Count, total and max of a length."""

    count: int = 0
    total: int = 0
    max: int = 0

    def add(self, n: int) -> None:
        self.count += 1
        self.total += n
        self.max = max(self.max, n)


@dataclass
class LengthDistribution:
    """Exact percentiles of a token length: a count per distinct length (memory bounded by the longest)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, n: int) -> None:
        self.counts[n] += 1

    def percentile(self, q: float) -> int:
        """The smallest length that at least ``q`` percent of the values do not exceed (nearest rank)."""
        total = sum(self.counts.values())
        if not total:
            return 0
        rank, seen = max(1, -(-q * total // 100)), 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if seen >= rank:
                return length
        return max(self.counts)

    def describe(self) -> str:
        return ", ".join(f"p{q} {self.percentile(q)}" for q in (50, 90, 99)) + f", max {self.percentile(100)}"


@dataclass
class PreprocessSummary:
    """What a run wrote and what it left out, and why."""

    pairs_written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """reason (``too_long``: longer than --seq-length with --drop-long) -> pairs left out."""
    rejected_records: dict[str, int] = field(default_factory=dict)
    """reason (``engine.data.records.REJECT_REASONS``) -> malformed records skipped (--skip-bad-records)."""
    bad_records: list[str] = field(default_factory=list)
    """Where the first skipped records are (file:line: message)."""
    truncated: dict[str, int] = field(default_factory=dict)
    """what was cut to fit --seq-length (``prompt``, ``answers``, ``prompt_and_answers``) -> pairs."""
    prompt_not_shared: int = 0
    """Pairs whose chosen and rejected prompt ids differ: a token straddles the prompt/answer boundary in one
    of them (written with each side's exact prompt)."""
    identical: int = 0
    """Pairs whose chosen equals rejected (written, but they teach nothing)."""
    lengths: dict[str, LengthDistribution] = field(default_factory=dict)
    """Token lengths before truncation, to choose --seq-length by: prompt, chosen/rejected answer and ``pair``
    (prompt + the longer answer); unpaired: prompt, completion and ``sample``."""
    prompt: LengthStats = field(default_factory=LengthStats)
    """Prompt lengths as written (the chosen side's)."""
    chosen: LengthStats = field(default_factory=LengthStats)
    """Chosen sequence lengths (prompt + answer) as written."""
    rejected: LengthStats = field(default_factory=LengthStats)
    elapsed_s: float = 0.0
    output_files: list[str] = field(default_factory=list)
    unit: str = "pairs"
    """What a document is: pairs, or unpaired samples (whose chosen/rejected stats are desirable/undesirable)."""

    @property
    def tokens(self) -> int:
        return self.chosen.total + self.rejected.total

    def length(self, name: str) -> LengthDistribution:
        """The distribution of one token length, created on first use (the summary lists them in that order)."""
        return self.lengths.setdefault(name, LengthDistribution())

    def lines(self) -> list[str]:
        rate = max(self.elapsed_s, 1e-9)
        unit = self.unit
        good, bad = ("chosen", "rejected") if unit == "pairs" else ("desirable", "undesirable")

        def counts(d: dict[str, int]) -> str:
            return f"{sum(d.values())} {dict(sorted(d.items()))}"

        out = [
            f"{unit} written: {self.pairs_written} in {self.elapsed_s:.1f}s "
            f"({self.pairs_written / rate:.0f} {unit}/s, {self.tokens / rate:.0f} tokens/s)",
            f"records rejected (malformed, --skip-bad-records): {counts(self.rejected_records)}",
            f"{unit} dropped: {counts(self.dropped)}",
            f"{unit} truncated to --seq-length: {counts(self.truncated)}",
            f"pairs whose chosen and rejected prompt ids differ (a token straddles the prompt/answer boundary): "
            f"{self.prompt_not_shared}; chosen == rejected: {self.identical}" if unit == "pairs" else
            f"{good}: {self.chosen.count}, {bad}: {self.rejected.count}",
            f"tokens written: prompt {self.prompt.total}, {good} {self.chosen.total}, {bad} {self.rejected.total}",
        ]
        out += [f"{name} tokens before truncation: {d.describe()}" for name, d in self.lengths.items()]
        if self.bad_records:
            out.append("first bad records: " + "; ".join(self.bad_records))
        return out


class PrefixLock:
    """An exclusive ``flock`` on DIR/.NAME.lock while a run writes --output-prefix DIR/NAME.

    The kernel drops the lock when its holder dies, even by SIGKILL, so the run that takes it knows
    that staging files of the prefix left in DIR belong to a dead run, and two runs never write one
    prefix at once. The file is removed on release; a run that opened it just before takes the lock
    on a deleted file, which ``_open_locked`` notices (another inode at the path) and starts over.
    """

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, f".{name}.lock")
        self.prefix = os.path.join(directory, name)
        self.fd = self._open_locked()

    def _open_locked(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                holder = lock_or_holder(fd)
            except OSError as err:
                os.close(fd)
                raise DataError(f"--output-prefix {self.prefix}: cannot lock {self.path} ({err.strerror}); write "
                                "to a filesystem with flock support (local disk, NFSv4) and copy the files") from None
            if holder is not None:
                os.close(fd)
                raise DataError(f"--output-prefix {self.prefix} is being written by another preprocess_data.py "
                                f"run ({holder or 'holder unknown'}); wait for it to finish or choose another "
                                "--output-prefix")
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):  # not if someone removed it meanwhile
                os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


class PairShardWriter:
    """The four indexed datasets of a run (`keys`; the three unpaired ones in `UnpairedShardWriter`), under
    temporary names until ``commit``.

    Staging names are ``.NAME.tmpPID_packed_*``. Made under the prefix lock, the writer removes
    those of killed runs first (and logs them), and refuses an existing data set unless
    ``overwrite``. ``commit`` removes the old files before renaming the new ones in, so a crash in
    between leaves an incomplete set (which the trainer reports), never a mix of old and new files.
    """

    keys = OUTPUT_KEYS
    """The datasets it writes (with MARGIN_KEY when the records have a margin column)."""
    replaces = OUTPUT_KEYS + (MARGIN_KEY,)
    """The files of an old data set at the prefix that --overwrite removes: a margin file too, so none outlives
    the set it belongs to."""

    def __init__(self, output_prefix: str, overwrite: bool = False, margins: bool = False) -> None:
        if margins:
            self.keys = OUTPUT_KEYS + (MARGIN_KEY,)
        directory, name = os.path.split(os.path.abspath(output_prefix))
        os.makedirs(directory, exist_ok=True)
        names = dict.fromkeys(self.keys + self.replaces)
        self.final = {k: output_path_prefix(os.path.join(directory, name), k) for k in names}
        temp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
        self.temp = {k: output_path_prefix(temp, k) for k in names}
        self.builders = {}
        self.lock = PrefixLock(directory, name)
        try:
            _remove_stale_staging(directory, name)
            self.replaced = [self.final[k] + ext for k in self.replaces for ext in (".bin", ".idx")
                             if os.path.exists(self.final[k] + ext)]
            if self.replaced and not overwrite:
                more = f" and {len(self.replaced) - 1} more" if len(self.replaced) > 1 else ""
                raise DataError(f"--output-prefix {output_prefix} holds a data set already ({self.replaced[0]}{more}); "
                                "pass --overwrite to replace it, or choose another --output-prefix")
            for k in self.keys:
                builder = IndexedDatasetBuilder(self.temp[k] + ".bin",
                                                dtype=np.float32 if k == MARGIN_KEY else np.int32)
                # megatron opens the .bin with Python's 8 KiB buffer: a 1 MiB one makes writes ~4x cheaper
                builder.data_file.close()
                builder.data_file = open(self.temp[k] + ".bin", "wb", buffering=WRITE_BUFFER)
                self.builders[k] = builder
        except BaseException:
            self.abort()
            raise

    def add(self, chosen: np.ndarray, rejected: np.ndarray, prompt: int, rejected_prompt: int | None = None,
            margin: float | None = None) -> None:
        """One pair; ``prompt`` tokens of each side are masked (``rejected_prompt`` of the rejected side if given),
        and its margin written when the data set has a margin column."""
        if MARGIN_KEY in self.builders:
            self.builders[MARGIN_KEY].add_document(np.asarray([margin], dtype=np.float32), [1])
        rejected_prompt = prompt if rejected_prompt is None else rejected_prompt
        for side, ids, prompt in (("chosen", chosen, prompt), ("rejected", rejected, rejected_prompt)):
            labels = ids.copy()
            labels[:prompt] = IGNORE_INDEX
            self.builders[f"{side}_input_ids"].add_document(ids, [ids.size])
            self.builders[f"{side}_labels"].add_document(labels, [labels.size])

    def commit(self) -> list[str]:
        for k, builder in self.builders.items():
            builder.finalize(self.temp[k] + ".idx")
        for path in self.replaced:
            os.remove(path)
        files = []
        for k in self.keys:
            for ext in (".bin", ".idx"):
                os.replace(self.temp[k] + ext, self.final[k] + ext)
                files.append(self.final[k] + ext)
        if self.replaced:
            logger.info("--overwrite: replaced %d existing file(s) of --output-prefix %s", len(self.replaced),
                        self.lock.prefix)
        self.lock.release()
        return files

    def abort(self) -> None:
        for k, builder in self.builders.items():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(self.temp[k] + ext):
                    os.remove(self.temp[k] + ext)
        self.lock.release()


class UnpairedShardWriter(PairShardWriter):
    """The three indexed datasets of an unpaired (KTO) run."""

    keys = replaces = UNPAIRED_KEYS

    def add(self, ids: np.ndarray, prompt_len: int, desirable: bool) -> None:
        labels = ids.copy()
        labels[:prompt_len] = IGNORE_INDEX
        self.builders["completion_input_ids"].add_document(ids, [ids.size])
        self.builders["completion_labels"].add_document(labels, [labels.size])
        self.builders["desirable"].add_document(np.array([int(desirable)], dtype=np.int32), [1])


def _remove_stale_staging(directory: str, name: str) -> None:
    """Removes the staging files of --output-prefix DIR/NAME left by killed runs (call under its lock)."""
    keys = "|".join(OUTPUT_KEYS + (MARGIN_KEY,) + UNPAIRED_KEYS)
    staging = re.compile(rf"\.{re.escape(name)}\.tmp(\d+)_packed_({keys})_document\.(bin|idx)")
    stale = sorted(f for f in os.listdir(directory) if staging.fullmatch(f))
    for file in stale:
        os.remove(os.path.join(directory, file))
    if stale:
        pids = sorted({int(staging.fullmatch(f).group(1)) for f in stale})
        logger.warning("removed %d staging file(s) of --output-prefix %s left by a killed run (pid %s): %s",
                       len(stale), os.path.join(directory, name), ", ".join(map(str, pids)), ", ".join(stale))


class _Progress:
    """Logs docs/s, tokens/s, elapsed and ETA (from bytes read) every ``interval`` records."""

    def __init__(self, interval: int, total_bytes: int) -> None:
        self.interval, self.total_bytes = interval, total_bytes
        self.start = time.perf_counter()
        self.records = self.bytes = self.tokens = 0

    def update(self, nbytes: int, tokens: int) -> None:
        self.records += 1
        self.bytes += nbytes
        self.tokens += tokens
        if self.records % self.interval == 0:
            elapsed = time.perf_counter() - self.start
            eta = elapsed * (self.total_bytes - self.bytes) / self.bytes if self.bytes else float("nan")
            logger.info("processed %d records (%.0f docs/s, %.0f tokens/s), elapsed %.1fs, ETA %.1fs",
                        self.records, self.records / elapsed, self.tokens / elapsed, elapsed, max(eta, 0.0))


class _Feeder:
    """Hands records to the workers at most ``limit`` ahead of the writer.

    ``Pool.imap`` reads its input as fast as it can, which would hold a whole
    large input in memory; each record takes a slot that the writer gives back.
    Also remembers record sizes (bytes) for the progress ETA.
    """

    def __init__(self, records, limit: int) -> None:
        self.records = records
        self.slots = threading.Semaphore(limit)
        self.sizes: dict[tuple[int, int], int] = {}
        self.stopped = False

    def __iter__(self):
        for source, index, payload, nbytes in self.records:
            self.slots.acquire()
            if self.stopped:
                return
            self.sizes[source, index] = nbytes
            yield source, index, payload

    def done(self, source: int, index: int) -> int:
        """Free the record's slot; returns its size in bytes."""
        self.slots.release()
        return self.sizes.pop((source, index))

    def stop(self) -> None:
        """Let a feeding thread blocked on a slot finish (on error, before the pool is terminated)."""
        self.stopped = True
        self.slots.release()


def _check_columns(sources: list[Source], handler) -> None:
    """Report --map-keys columns missing from each file's first record before any work."""
    for source in sources:
        columns = first_record_columns(source)
        if columns is None:
            continue
        for logical, column in handler.explicit_columns.items():
            if column not in columns:
                raise DataError(f"--map-keys: column {column!r} (for {logical!r}) is not in {source.path}; "
                                f"its columns are {sorted(columns)}")


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize all pairs of ``config.input`` into the four output datasets."""
    start = time.perf_counter()
    sources = find_sources(config.input)
    encoder = build_encoder(config)  # validates handler, template and tokenizer before any work
    _check_columns(sources, encoder.handler)
    logger.info("preprocessing %d file(s) with %d worker(s), --prompt-type %s, %s",
                len(sources), config.workers, config.prompt_type, config.handler_name)

    summary = PreprocessSummary(unit="samples" if config.unpaired else "pairs")
    progress = _Progress(config.log_interval, total_bytes(sources))
    feeder = _Feeder(read_records(sources), limit=CHUNK_SIZE * config.workers * 8)
    pool = writer = None
    try:
        if config.workers == 1:
            results = map(encoder, feeder)
        else:
            fork = "fork" in multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            pool = ctx.Pool(config.workers, initializer=_init_worker, initargs=(encoder if fork else config,))
            results = pool.imap(_encode_in_worker, feeder, chunksize=CHUNK_SIZE)
        # after the fork: workers a killed run leaves behind must not inherit (and keep) the prefix lock
        writer = encoder.writer(config.output_prefix, config.overwrite)
        for result in results:
            nbytes = feeder.done(result.source, result.index)
            if isinstance(result, RecordFailure):
                where = sources[result.source].where(result.index)
                about = f" field {result.field!r}:" if result.field else ""
                if result.reason == "too_long":
                    summary.dropped[result.reason] = summary.dropped.get(result.reason, 0) + 1
                elif not config.skip_bad_records:
                    raise DataError(f"{where}:{about} {result.message} (use --skip-bad-records to skip such records)")
                else:
                    summary.rejected_records[result.reason] = summary.rejected_records.get(result.reason, 0) + 1
                    if len(summary.bad_records) < MAX_LISTED_BAD:
                        summary.bad_records.append(f"{where}:{about} {result.message}")
                progress.update(nbytes, 0)
                continue
            tokens = encoder.write(result, writer, summary, sources[result.source].where(result.index))
            progress.update(nbytes, tokens)
        if summary.pairs_written == 0:
            raise DataError(f"--input {config.input!r}: no {summary.unit} to write")
        summary.output_files = writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        feeder.stop()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.elapsed_s = time.perf_counter() - start
    for line in summary.lines():
        logger.info(line)
    return summary
