"""Every flag README.md and docs/ name exists, spelled so, in the --help of a program that takes it."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

from tests.distributed.harness import REPO_ROOT, run_ranks

FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*")
"""A flag in text; not the '--' inside a heading anchor (#reward-models---stage-rm) or a range (thumbs-up--down)."""
UPSTREAM = {
    "--disable_prompt_loss": "the ORPO authors' training script (docs/objectives.md compares it)",
    "--gamma-beta-ratio": "MindSpeed-LLM's SimPO (docs/objectives.md compares it)",
}
"""Flags of other projects the docs quote, named as such where they appear."""
SCRIPT_FLAGS = {"benchmarks/*.py": re.compile(r'add_argument\(\s*"(--[a-z0-9-]+)"'),
                "scripts/*.sh": re.compile(r"^\s*(--[a-z0-9-]+)\)", re.M)}
"""Flags of the repository's benchmarks and shell scripts (parsers built inside their main, `case` labels): read from
their source."""


def documented_flags() -> dict[str, set[str]]:
    docs = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    return {path.relative_to(REPO_ROOT).as_posix(): set(FLAG.findall(path.read_text())) for path in docs}


def help_flags() -> set[str]:
    """The flags in every CLI's --help, and torchrun's (the launch scripts and docs pass some)."""
    sys.path[:0] = [str(REPO_ROOT / "tools"), str(REPO_ROOT / "tools" / "checkpoint")]
    import convert_ckpt
    import plot_metrics
    import preprocess_data
    import pretrain_dpo
    import score
    from torch.distributed.run import get_args_parser

    flags = set(get_args_parser()._option_string_actions)
    for program in (pretrain_dpo, preprocess_data, convert_ckpt, score, plot_metrics):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                program.main(["--help"])
            except SystemExit as exit:
                assert exit.code == 0, program.__name__
        flags |= set(FLAG.findall(out.getvalue()))
    return flags


def test_every_documented_flag_is_in_a_programs_help():
    known = run_ranks(help_flags, 1)[0]
    assert {"--stage", "--unpair", "--save-lora-to-hf", "--batch-size", "--title", "--nproc-per-node"} <= known
    for pattern, declaration in SCRIPT_FLAGS.items():
        for script in REPO_ROOT.glob(pattern):
            known |= set(declaration.findall(script.read_text()))
    assert {"--shape", "--device", "--dry-run"} <= known
    unknown = {doc: sorted(flags - known - set(UPSTREAM)) for doc, flags in documented_flags().items()}
    assert not any(unknown.values()), unknown
