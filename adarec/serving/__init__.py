"""Serving a trained run: `adarec export` writes the item table and a faiss index beside the run,
`Recommender` answers top-k queries from them (docs/serving.md).

The split of work follows the scoring contract (adarec/models/scoring.py): a model scores items
by user_query(ids) @ item_table().T, so the item side is exported once (items.npy + items.faiss)
and only the user side runs per request. Files, one job each:

* served_run.py: the run's config, data file and weights, loaded for serving;
* queries.py: a history -> the model's left-padded input row and the items to exclude;
* export.py: `export_run` and the export.json record that tells a stale export;
* recommender.py: `Recommender`, query batches through the model and the index.
"""

from .export import export_run
from .recommender import Recommendation, Recommender

__all__ = ["Recommendation", "Recommender", "export_run"]
