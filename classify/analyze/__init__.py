"""Biology views on the store: why are cells called resistant?

Modules (one concept each): :mod:`~classify.analyze.data` (expression + labels),
:mod:`~classify.analyze.de` / :mod:`~classify.analyze.de_run` (differential expression),
:mod:`~classify.analyze.enrich` (over-representation, GMT), :mod:`~classify.analyze.genesets`
(GO/KEGG sets from org.Hs.eg.db), :mod:`~classify.analyze.biomarkers` (LightGBM SHAP/gain),
:mod:`~classify.analyze.separation` (silhouette, kNN purity, UMAP), :mod:`~classify.analyze.pseudotime`
(DPT), :mod:`~classify.analyze.geneview` (one gene everywhere), :mod:`~classify.analyze.harmony`
(batch-corrected revisions), :mod:`~classify.analyze.confidence` (label confidence stars),
:mod:`~classify.analyze.celltypes` (marker-based cell types, resistant/sensitive per type),
:mod:`~classify.analyze.ccc` (cell–cell communication with liana), :mod:`~classify.analyze.context_plots`
(their figures),
:mod:`~classify.analyze.plots` (figures + report index), :mod:`~classify.analyze.tables` (catalog
tables). CLI: :mod:`~classify.analyze.commands` (``scdrugmap analyze``, ``scdrugmap genesets``) and
:mod:`~classify.analyze.context_commands` (``analyze ccc``, ``analyze celltypes``).
"""

from __future__ import annotations
