"""The data the model sees: shards read and decoded (shards.py), the training stream of candidate
micro-batches with its DataLoader (candidates.py), and the fixed eval set (eval.py)."""
from pipeline.data.candidates import (CandidateBatches, DataFaults, loader_kwargs, micro_steps_per_epoch,
                                      rank_shards, train_loader)
from pipeline.data.eval import eval_batches
from pipeline.data.shards import (CorruptSampleError, SampleMismatchError, SkipCounter, decode_sample, file_sha256,
                                  shard_stream)

__all__ = ["CandidateBatches", "CorruptSampleError", "DataFaults", "SampleMismatchError", "SkipCounter",
           "decode_sample", "eval_batches", "file_sha256", "loader_kwargs", "micro_steps_per_epoch", "rank_shards", "shard_stream",
           "train_loader"]
