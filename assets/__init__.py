"""The asset graph, one module per stage: raw inputs -> prepared images -> tags -> captions -> training -> evaluation."""

from assets.aesthetic_embedding import aesthetic_embedding
from assets.evaluation_grid import evaluation_grid
from assets.evaluation_metrics import evaluation_metrics
from assets.evaluation_report import evaluation_report
from assets.observations import observed_assets, raw_images, settings_assets
from assets.prepared_images import prepared_images
from assets.tag_scores import tag_scores
from assets.tag_table import tag_table
from assets.textual_inversion import textual_inversion
from assets.trained_methods import METHOD_ASSETS, TRAINED_METHODS

computed_assets = [
    prepared_images, tag_scores, tag_table, *METHOD_ASSETS, evaluation_grid, evaluation_metrics, evaluation_report,
    aesthetic_embedding,
]
all_assets = [*observed_assets, *computed_assets]

__all__ = [
    "METHOD_ASSETS",
    "TRAINED_METHODS",
    "aesthetic_embedding",
    "all_assets",
    "computed_assets",
    "evaluation_grid",
    "evaluation_metrics",
    "evaluation_report",
    "observed_assets",
    "prepared_images",
    "raw_images",
    "settings_assets",
    "tag_scores",
    "tag_table",
    "textual_inversion",
]
