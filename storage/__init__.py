"""Parquet stage tables, atomic writes and the DuckDB catalog over them."""
from facets.storage.catalog import Catalog
from facets.storage.stages import FAILURES, STAGE_MODELS, TABLE_MODELS, model_of
from facets.storage.store import Store, new_writer_id

__all__ = ["FAILURES", "STAGE_MODELS", "TABLE_MODELS", "Catalog", "Store", "model_of", "new_writer_id"]
