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
positions set to -100 (aligned, not shifted: the trainer shifts). Unpaired
(KTO) data, from ``--handler-name UnpairedHandler`` or pairwise records with
``--unpair``, goes the same way into
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
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from engine.data.handlers import HANDLERS, RecordError, build_handler
from engine.data.readers import DataError, Source, find_sources, first_record_columns, read_records, total_bytes
from engine.data.templates import ChatEncoder, get_template
from engine.data.truncation import truncate_lengths
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

    input: str = option(help="a JSONL, JSON-array or parquet file, or a directory/glob of them")
    output_prefix: str = option(help="OUT/name; files are OUT/name_packed_*_document.{bin,idx}")
    tokenizer: TokenizerConfig = option(cli=False, help="the tokenizer flags")
    handler_name: str = option("AlpacaStylePairwiseHandler", "input data shape; UnpairedHandler: unpaired (KTO) "
                                                              "records {prompt or messages, completion, label}",
                               choices=sorted({**HANDLERS, **UNPAIRED_HANDLERS}))
    unpair: bool = option(False, "write unpaired (KTO) data from pairwise records: each pair becomes two samples, "
                                 "its chosen answer desirable and its rejected answer undesirable")
    prompt_type: str = option("empty", "chat template (see engine/data/templates.json)")
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
    prompt_len: int
    """Prompt tokens kept (masked in both sequences)."""
    truncated: bool
    identical: bool
    margin: float | None = None
    """The pair's margin column (--map-keys margin), if mapped."""


class EncodedUnpaired(NamedTuple):
    source: int
    index: int
    documents: list[tuple[bytes, int, bool]]
    """Per sample of the record (two under --unpair): int32 ids of prompt + completion, prompt tokens kept,
    desirable."""
    truncated: int


class RecordFailure(NamedTuple):
    source: int
    index: int
    reason: str
    """``bad_record`` or ``too_long``."""
    field: str | None
    message: str


class PairEncoder:
    """Record -> EncodedPair or RecordFailure; one per process."""

    def __init__(self, config: PreprocessConfig) -> None:
        if config.handler_name in UNPAIRED_HANDLERS:
            self.handler = UNPAIRED_HANDLERS[config.handler_name](config.map_keys)
        else:
            self.handler = build_handler(config.handler_name, config.map_keys)
        self.chat = ChatEncoder(get_template(config.prompt_type, config.prompt_type_path),
                                build_tokenizer(config.tokenizer))
        self.seq_length = config.seq_length
        self.drop_long = config.drop_long

    def __call__(self, item: tuple[int, int, bytes | dict]) -> EncodedPair | RecordFailure:
        source, index, payload = item
        try:
            record = _parse(payload)
            sample = self.handler(record)
            margin = self.handler.margin(record)
        except RecordError as e:
            return RecordFailure(source, index, "bad_record", e.field, str(e))
        prompt = self.chat.encode_prompt(sample.conversation)
        chosen = self.chat.encode_response(sample.chosen)
        rejected = self.chat.encode_response(sample.rejected)
        truncated = False
        if self.seq_length is not None and len(prompt) + max(len(chosen), len(rejected)) > self.seq_length:
            if self.drop_long:
                n = len(prompt) + max(len(chosen), len(rejected))
                return RecordFailure(source, index, "too_long", None, f"{n} tokens > --seq-length")
            keep_prompt, keep_response = truncate_lengths(len(prompt), max(len(chosen), len(rejected)),
                                                          self.seq_length)
            prompt, chosen, rejected = prompt[len(prompt) - keep_prompt:], chosen[:keep_response], \
                rejected[:keep_response]
            truncated = True
        return EncodedPair(source, index, np.asarray(prompt + chosen, dtype=np.int32).tobytes(),
                           np.asarray(prompt + rejected, dtype=np.int32).tobytes(), len(prompt), truncated,
                           sample.chosen == sample.rejected, margin)

    def writer(self, output_prefix: str, overwrite: bool) -> PairShardWriter:
        return PairShardWriter(output_prefix, overwrite, margins=self.handler.has_margin)

    @staticmethod
    def write(result: EncodedPair, writer: PairShardWriter, summary: PreprocessSummary, where: str) -> int:
        """Adds a result to the shards and the summary; returns the tokens written."""
        chosen = np.frombuffer(result.chosen, dtype=np.int32)
        rejected = np.frombuffer(result.rejected, dtype=np.int32)
        writer.add(chosen, rejected, result.prompt_len, result.margin)
        summary.pairs_written += 1
        summary.truncated += result.truncated
        if result.identical:
            summary.identical += 1
            if summary.identical <= MAX_LISTED_BAD:
                logger.warning("%s: chosen == rejected", where)
        summary.prompt.add(result.prompt_len)
        summary.chosen.add(chosen.size)
        summary.rejected.add(rejected.size)
        return chosen.size + rejected.size


class UnpairedEncoder(PairEncoder):
    """Record -> EncodedUnpaired (one sample, or a pair's two under --unpair) or RecordFailure; each sample
    is truncated on its own by the pairwise rule (its completion as the longest answer)."""

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
        except RecordError as e:
            return RecordFailure(source, index, "bad_record", e.field, str(e))
        samples = unpair(sample) if self.unpair else sample
        documents, truncated = [], 0
        for s in samples:
            prompt, completion = self.chat.encode_prompt(s.conversation), self.chat.encode_response(s.completion)
            n = len(prompt) + len(completion)
            if self.seq_length is not None and n > self.seq_length:
                if self.drop_long:
                    return RecordFailure(source, index, "too_long", None, f"{n} tokens > --seq-length")
                keep_prompt, keep_completion = truncate_lengths(len(prompt), len(completion), self.seq_length)
                prompt, completion = prompt[len(prompt) - keep_prompt:], completion[:keep_completion]
                truncated += 1
            documents.append((np.asarray(prompt + completion, dtype=np.int32).tobytes(), len(prompt), s.desirable))
        return EncodedUnpaired(source, index, documents, truncated)

    def writer(self, output_prefix: str, overwrite: bool) -> UnpairedShardWriter:
        return UnpairedShardWriter(output_prefix, overwrite)

    @staticmethod
    def write(result: EncodedUnpaired, writer: UnpairedShardWriter, summary: PreprocessSummary, where: str) -> int:
        """Adds a result to the shards and the summary (desirable samples as `chosen`, undesirable as
        `rejected`); returns the tokens written."""
        tokens = 0
        for ids, prompt_len, desirable in result.documents:
            ids = np.frombuffer(ids, dtype=np.int32)
            writer.add(ids, prompt_len, desirable)
            summary.pairs_written += 1
            summary.prompt.add(prompt_len)
            (summary.chosen if desirable else summary.rejected).add(ids.size)
            tokens += ids.size
        summary.truncated += result.truncated
        return tokens


def _parse(payload: bytes | dict) -> dict:
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"not valid UTF-8 (byte 0x{payload[e.start]:02x} at column {e.start + 1})") from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(payload, dict):
        raise RecordError(f"a record must be a JSON object, got {type(payload).__name__}")
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

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class PreprocessSummary:
    """What a run wrote and what it left out, and why."""

    pairs_written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """reason (``bad_record``, ``too_long``) -> pairs left out."""
    bad_records: list[str] = field(default_factory=list)
    """Where the first skipped records are (file:line: message)."""
    truncated: int = 0
    identical: int = 0
    """Pairs whose chosen equals rejected (written, but they teach nothing)."""
    prompt: LengthStats = field(default_factory=LengthStats)
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

    def lines(self) -> list[str]:
        rate = max(self.elapsed_s, 1e-9)
        unit = self.unit
        good, bad = ("chosen", "rejected") if unit == "pairs" else ("desirable", "undesirable")
        out = [
            f"{unit} written: {self.pairs_written} in {self.elapsed_s:.1f}s "
            f"({self.pairs_written / rate:.0f} {unit}/s, {self.tokens / rate:.0f} tokens/s)",
            f"{unit} dropped: {sum(self.dropped.values())} {dict(sorted(self.dropped.items()))}",
            f"{unit} truncated: {self.truncated}" + ("; chosen == rejected: " + str(self.identical)
                                                     if unit == "pairs" else f"; {good}: {self.chosen.count}"),
            f"tokens: prompt {self.prompt.total}, {good} {self.chosen.total}, {bad} {self.rejected.total}",
        ]
        out += [f"{name} length: max {s.max}, mean {s.mean:.1f}"
                for name, s in (("prompt", self.prompt), (good, self.chosen), (bad, self.rejected))]
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

    def add(self, chosen: np.ndarray, rejected: np.ndarray, prompt_len: int, margin: float | None = None) -> None:
        if MARGIN_KEY in self.builders:
            self.builders[MARGIN_KEY].add_document(np.asarray([margin], dtype=np.float32), [1])
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            labels = ids.copy()
            labels[:prompt_len] = IGNORE_INDEX
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
                if result.reason == "bad_record" and not config.skip_bad_records:
                    raise DataError(f"{where}:{about} {result.message} (use --skip-bad-records to skip such records)")
                summary.dropped[result.reason] = summary.dropped.get(result.reason, 0) + 1
                if result.reason == "bad_record" and len(summary.bad_records) < MAX_LISTED_BAD:
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
