"""Evaluation of generated singing videos (DESIGN section 5; definitions in reference/metrics.md).

`singer.evaluate.metrics` holds the exact, offline metrics of the paper (SSIM, PSNR, CPBD, LMD,
Diversity, BAS) and two beyond it (identity similarity, mouth-opening correlation), one file each.
"""
