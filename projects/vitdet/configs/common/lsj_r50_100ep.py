"""LSJ R50-FPN Mask R-CNN, COCO, 100 epochs at batch 64: detectron2's own
``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`` (shipped with detectron2 ≥ 0.6: from scratch,
SyncBN, 1024 px large-scale jitter, SGD lr 0.1, momentum 0.9, weight decay 4e-5, 500 iterations
of linear warm-up from 0.067, LR ×0.1 at 163889 and 177546 of 184375, AMP). The base of the
large-batch configs (``lsj_r50_*``)."""

import os
import sys

from detectron2 import model_zoo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # projects/vitdet
from vitdet.large_batch import require  # noqa: E402

RECIPE = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
require(f"LSJ R50-FPN Mask R-CNN ({RECIPE})")
try:
    _recipe = model_zoo.get_config(RECIPE)
except RuntimeError as e:  # detectron2 < 0.6: not in its model zoo
    import detectron2

    raise ImportError(f"LSJ R50-FPN Mask R-CNN needs detectron2 ≥ 0.6, whose model zoo ships {RECIPE}; "
                      f"installed: detectron2 {detectron2.__version__} ({e})") from None
dataloader, lr_multiplier, model, optimizer, train = (
    _recipe.dataloader, _recipe.lr_multiplier, _recipe.model, _recipe.optimizer, _recipe.train)
