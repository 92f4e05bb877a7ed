"""Data prep: shard text corpora into WebDataset tar files for BERT MLM pretraining.

The shard directory layout and manifest keys are the contract in ``docs/ARCHITECTURE.md``
section 1; ``docs/DATA_PREP.md`` documents the CLI, the flags and the behaviour.
"""

__version__ = "0.1.0"

FORMAT_VERSION = 1
