"""Turn preference data (pairs, or unpaired samples for KTO) into megatron indexed shards for training.

python preprocess_data.py --input data.jsonl --tokenizer-type PretrainedFromHF --tokenizer-name-or-path DIR \\
    --output-prefix OUT/name --workers 4 --handler-name AlpacaStylePairwiseHandler --prompt-type llama3
"""

import argparse
import logging
import sys
import warnings

# megatron-core warns on import that it falls back from TE/apex; preprocessing uses neither
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from engine.data.preprocess import PreprocessConfig, add_preprocess_args, preprocess  # noqa: E402
from engine.data.readers import DataError  # noqa: E402


def main(argv=None) -> int:
    parser = add_preprocess_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        preprocess(PreprocessConfig.from_args(args))
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
