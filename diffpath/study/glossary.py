"""What the study's metrics mean, in words: the text the report, the localisation table and the
front page show beside their tables (Markdown)."""

from __future__ import annotations

__all__ = ["DETECTION_METRICS", "LOCALIZATION_METRICS"]

#: OOD detection: AUROC, FPR@95, AUPR (image level, in-distribution positive)
DETECTION_METRICS = """\
* **AUROC** (area under the ROC curve): the probability that a random in-distribution test image
  scores higher (more typical) than a random OOD test image. 1 separates the sets perfectly, 0.5 is
  chance, below 0.5 ranks them the wrong way round. It needs no threshold. Tables give AUROC × 100.
* **FPR@95** (false-positive rate at 95% true-positive rate): put the threshold where 95% of the
  in-distribution images are accepted; FPR@95 is the fraction of OOD images accepted too. Lower is
  better: 0 means every OOD image is caught at that threshold.
* **AUPR** (area under the precision–recall curve, in-distribution positive, "AUPR-In"): the
  average precision of accepting in-distribution images, ranking by score. 1 is perfect; chance is
  the in-distribution share of the pair (one half for equal test sets).
"""
#: anomaly localisation: image AUROC, pixel AUROC, PRO (anomalous positive)
LOCALIZATION_METRICS = """\
* **image AUROC**: as AUROC, with the *anomalous* images the positive class and the image score
  (the maximum of the pooled map) as the ranking: the probability that a patched image scores
  above a normal one.
* **pixel AUROC**: every pixel of every image is one sample, positive inside the patch's mask;
  the probability that a random patch pixel is brighter in its map than a random other pixel.
* **PRO** (per-region overlap): for each threshold, the mean over the anomalous regions of the
  fraction of each region's pixels above it, integrated over the false-positive rate of normal
  pixels from 0 to 0.3 and divided by 0.3. Unlike pixel AUROC it weighs small and large regions
  alike; 1 is perfect.
"""
