"""Documents in, padded token batches with global sample ids out; knows nothing of LoGra.

A sample's id is its document's position among the valid documents (or the record's integer
"id" field; with --chunk, doc id x 2^16 + window), fixed before any sharding, so `--max-samples
N` selects the same N documents whatever the world size, and rank r takes documents r, r +
world, r + 2 world, ... of them.

- text: UTF-8 / JSON checks, `Document`, what a record may hold;
- sources: readers by file kind (jsonl, text, parquet, saved HF datasets), streamed;
- samples: tokenizing (truncation, windows), batches, the summed LM loss;
- identity: per-sample digests and `DataIdentity`;
- streaming: a rank's share, read and tokenized in two bounded passes;
- table: the per-sample table an index keeps beside its shards (ids, documents, digests).
"""

from logra_dist.data.identity import (
    DataIdentity,
    digest_from_words,
    digest_words,
    sample_digest,
    samples_digest,
)
from logra_dist.data.samples import (
    IGNORE,
    MAX_CHUNKS,
    Batch,
    TokenizedSample,
    Windows,
    batches,
    collate,
    pad_token_id,
    rank_samples,
    summed_lm_loss,
    tokenize,
    tokenize_documents,
)
from logra_dist.data.streaming import (
    BadSample,
    DataSpec,
    Plan,
    RankShare,
    Skipped,
    data_summary,
    documents,
    plan_identity,
    read_documents,
)
from logra_dist.data.table import SampleTable, write_table
from logra_dist.data.text import (
    UTF8_FIX,
    Document,
    check_surrogates,
    decode_text,
    json_record,
    native_id,
    record_to_document,
)

__all__ = [
    "IGNORE",
    "MAX_CHUNKS",
    "UTF8_FIX",
    "BadSample",
    "Batch",
    "DataIdentity",
    "DataSpec",
    "Document",
    "Plan",
    "RankShare",
    "SampleTable",
    "Skipped",
    "TokenizedSample",
    "Windows",
    "batches",
    "check_surrogates",
    "collate",
    "data_summary",
    "decode_text",
    "digest_from_words",
    "digest_words",
    "documents",
    "json_record",
    "native_id",
    "pad_token_id",
    "plan_identity",
    "rank_samples",
    "read_documents",
    "record_to_document",
    "sample_digest",
    "samples_digest",
    "summed_lm_loss",
    "tokenize",
    "tokenize_documents",
    "write_table",
]
