"""Records, loaders with precise errors, tokenisation and batching."""

from alignkit.data.loaders import DataError, LoadResult, load_records
from alignkit.data.records import RECORD_KINDS, Comparison, Demonstration, Judgement, PromptRecord, Rating
from alignkit.data.tokenize import Batch, Encoded, Encoder, TokenizeConfig, collate

__all__ = ["RECORD_KINDS", "Batch", "Comparison", "DataError", "Demonstration", "Encoded", "Encoder", "Judgement",
           "LoadResult", "PromptRecord", "Rating", "TokenizeConfig", "collate", "load_records"]
