"""The detector families gcp prunes without being told how to trace them: Ultralytics YOLO, torchvision
detection models and timm ``features_only`` backbones, one small file each (see :mod:`gcp.core.registry` for
what an adapter says). Importing this package registers them into the core's registry, in the order
``find_adapter`` tries them; none of the files imports its family's package until a model of it is seen.
"""

from gcp.adapters import timm, torchvision, ultralytics
from gcp.core.registry import register_adapter

for _family in (ultralytics, torchvision, timm):
    register_adapter(_family.ADAPTER, last=True)
